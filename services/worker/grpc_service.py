"""The worker's own gRPC API (proto/splitserve/worker/v1/worker.proto): Health and Stats of its
engine, for operators, probes and tests. Requests reach the engine over the engine link
(services/worker/link_server.py), not here."""

from __future__ import annotations

import time

import grpc

from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from services.worker.engine import EngineHost


class WorkerService(pb_grpc.WorkerServicer):
    """Serves one worker's Health and Stats."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> pb.HealthResponse:
        cfg = self.host.cfg
        try:
            await self.host.check_health()
            healthy, message = True, "ok"
        except Exception as exc:  # the engine reports its own failure modes
            healthy, message = False, f"{type(exc).__name__}: {exc}"
        return pb.HealthResponse(healthy=healthy, worker_id=cfg.worker_id, role=cfg.role.value,
                                 model=cfg.engine.name, message=message)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
                    ) -> pb.StatsResponse:
        c = self.host.counters
        return pb.StatsResponse(
            worker_id=self.host.cfg.worker_id,
            role=self.host.cfg.role.value,
            in_flight=self.host.in_flight,
            num_running_reqs=c.num_running_reqs,
            num_waiting_reqs=c.num_waiting_reqs,
            kv_cache_usage=c.kv_cache_usage,
            prefix_cache_queries=c.prefix_cache_queries,
            prefix_cache_hits=c.prefix_cache_hits,
            requests_total=c.requests_total,
            requests_aborted=c.requests_aborted,
            stats_age_s=time.time() - c.last_step_at if c.last_step_at else -1.0,
        )
