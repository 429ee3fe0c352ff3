"""Everything one worker runs in its process: engine, engine link, gRPC API (Health, Stats),
metrics, registry heartbeat.

Independent of Ray: the Ray actor (services/worker/actor.py) is a thin shell around it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import grpc
import psutil
from pydantic import BaseModel
from redis.asyncio import Redis

from router.block_hash import BlockHasher
from router.index_updater import IndexUpdater, IndexUpdaterConfig
from router.kv_events import SubscriberConfig
from router.prefix_index import PrefixIndex
from router.redis_client import index_redis_client, redis_client, stop_task
from router.registry import WorkerInfo, WorkerRegistry, WorkerState
from services.ports import port_outside_ephemeral_range
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from services.cluster_secret import ClusterSecret
from services.grpc_auth import TokenAuthInterceptor
from services.link import LinkKeys
from services.worker.config import WorkerConfig
from services.worker.kv_params_signing import KVParamsSigner, accept_window
from services.grpc_context import ServerContextInterceptor
from services.grpc_options import server_options
from services.worker.environment import engine_environment
from services.worker.observability import setup_observability
from services.worker.thread_niceness import set_process_niceness
from services.worker.shm import segments_mapped_by_children, unlink_segments
from services.worker.link_server import LinkServer

log = logging.getLogger(__name__)


class WorkerEndpoints(BaseModel):
    """Where a started worker can be reached."""

    worker_id: str
    address: str
    link_address: str = ""
    metrics_url: str
    kv_events_endpoint: str
    nixl_side_channel_port: int
    pid: int
    node: str = ""
    ray_node_id: str = ""  # the Ray node it runs on (empty outside Ray)
    engine_pids: list[int] = []
    shm_segments: list[str] = []


def ray_placement() -> dict[str, str]:
    """The placement group and resources Ray gave this worker (empty outside Ray)."""
    try:
        import json

        import ray

        if not ray.is_initialized():
            return {}
        ctx = ray.get_runtime_context()
        return {"placement_group": ctx.get_placement_group_id() or "",
                "ray_resources": json.dumps(ctx.get_assigned_resources(), sort_keys=True)}
    except Exception:
        return {}


def ray_node_id() -> str:
    """The id of the Ray node this process runs on (empty outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


def node_address() -> str:
    """This node's IP address as Ray sees it (else the address of the host name)."""
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def _child_pids() -> list[int]:
    """Processes this worker started (the engine core and its helpers)."""
    try:
        return [p.pid for p in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


def stalled_seconds(busy_since: float | None, last_step_at: float, now: float) -> float:
    """How long an engine with requests has gone without a step: since its last step or since
    it got work after being idle, whichever is later (an engine idle for minutes that has just
    been given a request is not stalled). 0 without requests in flight (`busy_since` None)."""
    if busy_since is None:
        return 0.0
    return max(0.0, now - max(busy_since, last_step_at))


class WorkerProcess:
    """Starts and stops one worker inside the current process."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.host = None  # EngineHost, created in start() after the environment is set
        self._server: grpc.aio.Server | None = None
        self._link_server: LinkServer | None = None
        self._metrics_httpd = None
        self._redis: Redis | None = None
        self._registry: WorkerRegistry | None = None
        self._heartbeat: asyncio.Task | None = None
        self._shm_segments: set = set()
        self._index_updater: IndexUpdater | None = None
        self._info: WorkerInfo | None = None
        self.endpoints: WorkerEndpoints | None = None

    async def start(self) -> WorkerEndpoints:
        if self.cfg.host == "auto":  # bind and advertise this node's address (a pod's IP)
            self.cfg = self.cfg.model_copy(update={"host": node_address()})
        cfg = self.cfg
        # Every port below takes only callers holding the cluster secret (docs/security.md):
        # no secret (or a pyzmq without CURVE for the link) fails the start, never opens them.
        secret = ClusterSecret.required(f"worker {cfg.worker_id}")
        link_keys = LinkKeys.derive(secret)
        (cfg.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        side_port = port_outside_ephemeral_range(cfg.host)
        os.environ.update(engine_environment(cfg, side_port))
        metrics = setup_observability(cfg)  # logs (ours and vLLM's), tracing, metrics
        _check_niceness(cfg.engine.niceness)
        kv_events = f"ipc://{cfg.run_dir / f'kv-{cfg.worker_id}.sock'}"
        kv_replay = f"ipc://{cfg.run_dir / f'kv-replay-{cfg.worker_id}.sock'}"

        from services.worker.engine import KV_EVENTS_TOPIC, EngineHost
        from services.worker.grpc_service import WorkerService

        self.host = EngineHost(cfg, kv_events, kv_replay)
        self.host.metrics = metrics
        await self.host.start()
        self._shm_segments = segments_mapped_by_children()

        self._server = grpc.aio.server(
            interceptors=[TokenAuthInterceptor(secret), ServerContextInterceptor()],
            options=server_options(64 * 1024 * 1024))
        signer = KVParamsSigner(secret, ttl_s=accept_window(cfg.engine.kv_lease_duration_s))
        pb_grpc.add_WorkerServicer_to_server(WorkerService(self.host), self._server)
        port = self._server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
        await self._server.start()
        self._link_server = LinkServer(self.host.engine, cfg.host, cfg.link_port, link_keys,
                                       signer, metrics.kv_params_refused_by, self.host.counters,
                                       self.host.record_link_step, self.host.speed)
        link_port = await self._link_server.start()
        self.host.link = self._link_server

        from prometheus_client import start_http_server

        self._metrics_httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
        metrics_port = self._metrics_httpd.server_port

        self.endpoints = WorkerEndpoints(
            worker_id=cfg.worker_id,
            address=f"{cfg.host}:{port}",
            link_address=f"{cfg.host}:{link_port}",
            metrics_url=f"http://{cfg.host}:{metrics_port}/metrics",
            kv_events_endpoint=kv_events,
            nixl_side_channel_port=side_port,
            pid=os.getpid(),
            node=socket.gethostname(),
            ray_node_id=ray_node_id(),
            engine_pids=_child_pids(),
            shm_segments=sorted(str(p) for p in self._shm_segments),
        )
        self._redis = redis_client(cfg.redis_url)
        self._registry = WorkerRegistry(self._redis, cfg.namespace, ttl_s=cfg.registry_ttl_s)
        # Follow this engine's own KV events into the shared prefix index (cleared first:
        # entries of an earlier incarnation of this worker id would be stale).
        index_redis = index_redis_client(self._redis)  # the index's own Redis (Cluster), if any
        self._index_updater = IndexUpdater(
            PrefixIndex(index_redis, cfg.namespace, close_client=index_redis is not self._redis,
                        registry=self._redis if index_redis is not self._redis else None),
            IndexUpdaterConfig(worker_id=cfg.worker_id, subscriber=SubscriberConfig(
                endpoint=kv_events, replay_endpoint=kv_replay, topic=KV_EVENTS_TOPIC)),
            hasher=BlockHasher(cfg.engine.block_size, cfg.engine.prefix_caching_hash_algo,
                               cfg.engine.hash_seed),
        )
        self._index_updater.start()
        await asyncio.wait_for(self._index_updater.ready.wait(), timeout=30)
        self._info = WorkerInfo(
            worker_id=cfg.worker_id,
            role=cfg.role,
            address=self.endpoints.address,
            link_address=self.endpoints.link_address,
            model=cfg.engine.name,
            metrics_url=self.endpoints.metrics_url,
            block_size=cfg.engine.block_size,
            hash_algo=cfg.engine.prefix_caching_hash_algo,
            hash_seed=cfg.engine.hash_seed,
            pid=os.getpid(),
            node=socket.gethostname(),
            started_at=time.time(),
            **ray_placement(),
        )
        await self._registry.register(self._info)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        # The engine processes keep the worker's starting niceness; its own threads (and any it
        # starts later) step back behind them.
        nice = max(cfg.engine.actor_niceness, cfg.engine.niceness)
        log.info("worker threads at niceness %d (%d changed), engine at %d", nice,
                 set_process_niceness(nice), cfg.engine.niceness)
        log.info("worker %s (%s) serving on %s", cfg.worker_id, cfg.role.value,
                 self.endpoints.address)
        return self.endpoints

    async def _heartbeat_loop(self) -> None:
        assert self._registry is not None and self.host is not None
        while True:
            try:
                if getattr(self.host.engine, "errored", False):
                    log.error("engine of %s is dead; letting its registry entry expire",
                              self.cfg.worker_id)
                    return
                assert self._info is not None
                self._info.load = self.host.load()
                if not await self._registry.heartbeat(self._info):
                    log.warning("registry had lost %s (Redis restarted?): registered again",
                                self.cfg.worker_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep serving, try again next beat
                log.warning("registry heartbeat failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    async def drain(self, timeout_s: float, settle_s: float = 1.5) -> dict:
        """Take no new requests, finish those in flight, let held KV be read, then stop.

        The registry entry turns ``draining`` first (routers stop choosing this worker within
        their refresh interval, ``settle_s`` covers it); requests already here run to the end.
        A prefill worker also waits until the KV blocks it holds for decode workers are read
        (its KV usage drops to zero) or their lease would have expired. Then it stops.
        Returns what it waited for.
        """
        assert self.host is not None and self._info is not None
        started = time.monotonic()
        self._info.state = WorkerState.DRAINING
        if self._registry is not None:
            try:
                await self._registry.set_state(self.cfg.worker_id, WorkerState.DRAINING)
            except Exception:
                log.warning("could not publish draining state", exc_info=True)
        in_flight_at_start = self.host.in_flight
        await asyncio.sleep(settle_s)
        deadline = started + timeout_s
        served = self.host.counters.requests_total
        while self.host.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        unfinished = self.host.in_flight
        if self.cfg.role.value == "prefill":
            lease_end = min(deadline, time.monotonic() + self.cfg.engine.kv_lease_duration_s)
            while self.host.counters.kv_cache_usage > 0 and time.monotonic() < lease_end:
                await asyncio.sleep(0.1)
        result = {"worker_id": self.cfg.worker_id, "in_flight_at_start": in_flight_at_start,
                  "unfinished": unfinished,
                  "requests_during_drain": self.host.counters.requests_total - served,
                  "held_kv_usage": self.host.counters.kv_cache_usage,
                  "seconds": round(time.monotonic() - started, 3)}
        log.info("drained %s: %s", self.cfg.worker_id, result)
        await self.stop()
        return result

    async def health(self) -> dict:
        """Whether the engine serves (the controller's health loop calls this)."""
        if self.host is None:
            return {"healthy": False, "message": "not started"}
        try:
            if getattr(self.host.engine, "errored", False):
                return {"healthy": False, "message": "engine errored"}
            await self.host.check_health()
        except Exception as exc:
            return {"healthy": False, "message": f"{type(exc).__name__}: {exc}"}
        stalled = stalled_seconds(self.host.busy_since, self.host.counters.last_step_at,
                                  time.time())
        if stalled > self.cfg.engine_stall_timeout_s:
            return {"healthy": False, "message": (
                f"engine stalled: no step for {stalled:.0f}s with "
                f"{self.host.in_flight} requests in flight")}
        return {"healthy": True, "message": "ok", "in_flight": self.host.in_flight}

    async def stop(self) -> None:
        """Leave the registry, stop serving, shut the engine down, free its shared memory."""
        log.info("stopping worker %s", self.cfg.worker_id)
        try:
            if self._heartbeat is not None:
                # a beat stuck in a Redis call must not keep the worker registered
                await stop_task(self._heartbeat)
            if self._registry is not None:
                try:
                    await self._registry.deregister(self.cfg.worker_id)
                except Exception:
                    log.warning("could not deregister %s", self.cfg.worker_id, exc_info=True)
            if self._index_updater is not None:
                await self._index_updater.stop()
                try:
                    await self._index_updater.clear_entries()
                except Exception:
                    log.warning("could not clear index entries of %s", self.cfg.worker_id,
                                exc_info=True)
                await self._index_updater.index.aclose()
            if self._link_server is not None:
                await self._link_server.stop()
            if self._server is not None:
                await self._server.stop(grace=2.0)
            if self._metrics_httpd is not None:
                await asyncio.to_thread(self._metrics_httpd.shutdown)
            if self.host is not None:
                self.host.shutdown()
            log.info("worker %s stopped", self.cfg.worker_id)
        finally:
            if removed := unlink_segments(self._shm_segments):
                log.info("removed %d shared-memory segments the engine left behind",
                         len(removed))
            if self._redis is not None:
                await self._redis.aclose()


def _check_niceness(wanted: int) -> None:
    """Log the CPU niceness the engine will inherit; warn when it is not the configured one
    (the actor was started without the RAY_worker_niceness its pool sets)."""
    now = os.nice(0)
    if now == wanted:
        log.info("worker runs at niceness %d", now)
    else:
        log.warning("worker runs at niceness %d, not the configured %d: its engine gets less "
                    "CPU than the processes beside it", now, wanted)

