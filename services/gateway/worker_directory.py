"""The gateway's view of the live workers: a registry snapshot refreshed in the background,
gRPC channels to each worker, and the gateway's own in-flight count per worker.

With Redis away (down, or silent) the snapshot stays as it was and routing goes on with it;
each refresh is bounded by `health.deadline_s` and its outcome tells `health` (shared with the
request path's prefix-index lookups) whether Redis answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import grpc
from redis.asyncio import Redis

from router.dispatch_ledger import DispatchLedger
from router.redis_client import RedisHealth, stop_task
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole, WorkerState
from services import tracing
from services.cluster_secret import ClusterSecret
from services.controller.pool_sizes import PoolSizes
from services.gateway.generate_stream import SharedGenerateStream, WorkerStreams
from services.grpc_auth import client_interceptors as auth_interceptors
from services.grpc_context import client_interceptors
from services.grpc_options import channel_options
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class WorkerDirectory:
    """Live workers by role, with stubs to reach them."""

    def __init__(self, redis: Redis, namespace: str, model: str, secret: ClusterSecret,
                 refresh_s: float = 0.5, streams: WorkerStreams = "tcp",
                 health: RedisHealth | None = None) -> None:
        #: the cluster secret: every call and stream to a worker carries a credential from it
        self.secret = secret
        self.registry = WorkerRegistry(redis, namespace)
        self.health = health or RedisHealth(pause_s=2.0, deadline_s=1.0)
        self.pool_sizes = PoolSizes(redis, namespace)
        self.model = model
        self.refresh_s = refresh_s
        self.workers: list[WorkerInfo] = []
        self.in_flight: Counter[str] = Counter()
        #: this gateway's dispatches since the workers' last heartbeats (the kv cost model)
        self.ledger = DispatchLedger()
        self.streams = streams
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, SharedGenerateStream] = {}
        self._task: asyncio.Task | None = None
        self._refreshed = asyncio.Event()
        self._serving_seen_at = float("-inf")  # when a snapshot last had a serving worker

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def refresh(self) -> None:
        """Re-read the registry now (a probe of Redis: tried even while `health` pauses)."""
        workers = await self.health.call(self.registry.live_workers, probe=True)
        self.workers = [w for w in workers if w.model == self.model]
        if any(w.state == WorkerState.SERVING for w in self.workers):
            self._serving_seen_at = time.monotonic()
        live = {w.address for w in self.workers}
        for addr in [a for a in self._streams if a not in live]:
            await self._streams.pop(addr).close()
        for addr in [a for a in self._channels if a not in live]:
            await self._channels.pop(addr).close()
        self._refreshed.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep routing on the last snapshot
                log.warning("registry refresh failed (%s: %s); using last snapshot",
                            type(exc).__name__, exc)
            await asyncio.sleep(self.refresh_s)

    async def pools_healing(self, lost_grace_s: float = 10.0) -> bool:
        """Whether the controller is bringing workers up (some pool has workers starting, or
        fewer serving than desired): worth waiting for, rather than failing at once. Also
        while the registry lags behind (workers served a moment ago, and now Redis has no
        desired sizes, i.e. it restarted empty, or the controller still counts serving decode
        workers, e.g. their liveness keys expired while Redis was stopped): the workers
        register again on their next heartbeat."""
        try:
            desired = await self.health.call(self.pool_sizes.desired)
            observed, _ = await self.health.call(self.pool_sizes.observed)
        except Exception:
            return False
        if time.monotonic() - self._serving_seen_at < lost_grace_s and (
                not desired or any(observed[p].serving > 0 for p in ("decode", "both")
                                   if p in observed)):
            return True
        return any(o.starting > 0 or o.serving < desired.get(pool, 0)
                   for pool, o in observed.items())

    def by_role(self, *roles: WorkerRole) -> list[WorkerInfo]:
        """Serving workers of these roles (draining ones take no new requests)."""
        return [w for w in self.workers if w.role in roles and w.state == WorkerState.SERVING]

    @property
    def can_decode(self) -> bool:
        """Whether a decode-capable worker serves (role decode or both)."""
        return bool(self.by_role(WorkerRole.DECODE, WorkerRole.BOTH))

    @property
    def routable(self) -> bool:
        """Whether a request could be served now."""
        if self.by_role(WorkerRole.BOTH):
            return True
        return bool(self.by_role(WorkerRole.PREFILL)) and bool(self.by_role(WorkerRole.DECODE))

    def stub(self, worker: WorkerInfo) -> pb_grpc.WorkerStub:
        ch = self._channels.get(worker.address)
        if ch is None:
            ch = grpc.aio.insecure_channel(worker.address,
                                           interceptors=[*auth_interceptors(self.secret),
                                                         *client_interceptors()],
                                           options=channel_options(64 * 1024 * 1024))
            self._channels[worker.address] = ch
        return pb_grpc.WorkerStub(ch)

    def generate(self, worker: WorkerInfo, request: pb.GenerateRequest,
                 timeout: float | None) -> Any:
        """Start `request` on `worker`; returns a call to `read()` chunks from and `cancel()`.
        Over the worker's shared GenerateStream (services/gateway/generate_stream.py): on its
        framed TCP port (`tcp`, when the worker has one) or as a gRPC call (`grpc`); with
        `per-request`, or tracing on, one Generate call per request (each its own span)."""
        if self.streams == "per-request" or tracing.enabled():
            return self.stub(worker).Generate(request, timeout=timeout)
        stream = self._streams.get(worker.address)
        if stream is None:
            if self.streams == "tcp" and worker.stream_address:
                stream = SharedGenerateStream.over_tcp(worker.stream_address,
                                                       self.secret.stream_token)
            else:
                stream = SharedGenerateStream.over_grpc(self.stub(worker), worker.address)
            self._streams[worker.address] = stream
        return stream.generate(request, timeout)

    @contextmanager
    def track(self, *workers: WorkerInfo | None) -> Iterator[None]:
        """Count a request as in flight on these workers while the block runs."""
        ids = [w.worker_id for w in workers if w is not None]
        for i in ids:
            self.in_flight[i] += 1
        try:
            yield
        finally:
            for i in ids:
                self.in_flight[i] -= 1
                if self.in_flight[i] <= 0:
                    del self.in_flight[i]
