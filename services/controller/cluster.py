"""`splitserve up`: Redis, Ray, worker pools and a gateway, started and stopped together.

Start order: run directory and cluster secret (given, else generated; kept in
run_dir/cluster-secret, mode 0600, for the gateway; docs/security.md) -> Redis (private
unless --redis-url; supervised: restarted on its port if it dies, see redis_server.py) ->
Ray (local unless --ray-address) -> worker actors (engines load in parallel) -> gateway. Stop order is the
reverse. Everything this process started is stopped by PID; a final sweep kills any
descendant process still alive, so nothing is orphaned.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

import psutil

from services.cluster_secret import FILE_NAME, ClusterSecret
from services.controller.config import ClusterConfig
from services.controller.gateway_process import GatewayProcess
from services.controller.pools import WorkerPools, plan_workers
from services.controller.ray_session_dir import ray_session_dir, settle_ray_session_dir
from services.controller.reconciler import PoolController, desired_in_redis
from services.controller.redis_server import RedisServer, RedisSupervisor
from services.controller.state_file import (ClusterState, process_started_at, remove_state,
                                              write_state)
from services.gateway.config import GatewayConfig
from services.ports import free_port
from services.processes import kill_survivors
from services.worker.shm import segments_mapped_by_children, unlink_segments

log = logging.getLogger(__name__)

ALIVE_FILE = "controller.alive"
"""In the run directory: touched after every pass of the controller's loop (its liveness)."""


def gateway_config(cfg: ClusterConfig, redis_url: str, port: int, grpc_port: int
                   ) -> GatewayConfig:
    """The settings of a gateway of cluster `cfg` (whose Redis is `redis_url`) on these
    ports: the one `up` starts, or another one started beside it (`splitserve bench`)."""
    return GatewayConfig(
        model=cfg.engine.model, served_model_name=cfg.engine.served_model_name,
        max_model_len=cfg.engine.max_model_len or 2048, redis_url=redis_url,
        namespace=cfg.namespace, host=cfg.host, port=port, grpc_port=grpc_port,
        policy=cfg.policy, kv_policy=cfg.kv_policy, max_in_flight=cfg.max_in_flight,
        max_in_flight_per_client=cfg.max_in_flight_per_client,
        max_body_bytes=cfg.max_body_bytes, api_keys_file=cfg.api_keys_file,
        tenant_isolation=cfg.tenant_isolation,
        slow_client_timeout_s=cfg.slow_client_timeout_s, route_headers=cfg.route_headers,
        index_replica=cfg.index_replica, registry_feed=cfg.registry_feed,
        migration=cfg.migration,
        engine_args=cfg.engine.engine_args, frontend_args=cfg.frontend_args)


class Cluster:
    """One running cluster and everything it owns."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir or Path(tempfile.mkdtemp(prefix="splitserve-"))
        self.redis: RedisServer | None = None
        self.redis_supervisor: RedisSupervisor | None = None
        self.redis_url = cfg.redis_url
        self.secret: ClusterSecret | None = None
        self.secret_file: Path | None = None
        self.pools: WorkerPools | None = None
        self.controller: PoolController | None = None
        self.gateway: GatewayProcess | None = None
        self._ray_started = False
        self._ray_session_dir: Path | None = None  # a local Ray's, once started
        self._descendants: set[int] = set()
        self._shm_segments: set[Path] = set()

    def start(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        self.secret = (ClusterSecret.read(cfg.cluster_secret_file) if cfg.cluster_secret_file
                       else ClusterSecret.from_environment() or ClusterSecret.generate())
        self.secret_file = self.secret.write(self.run_dir / FILE_NAME)
        if self.redis_url is None:
            self.redis = RedisServer(self.run_dir, password=self.secret.redis_password)
            self.redis_url = self.redis.start()
            self.redis_supervisor = RedisSupervisor(self.redis)
            self.redis_supervisor.start()
        self._start_ray()
        self.pools = WorkerPools(cfg, self.redis_url, self.run_dir, self.secret)
        if kept := desired_in_redis(self.redis_url, cfg.namespace, list(self.pools.desired)):
            log.info("desired pool sizes from Redis (kept over the configured ones): %s", kept)
            self.pools.desired.update(kept)
        self.pools.start(timeout_s=cfg.startup_timeout_s)
        self.controller = PoolController(self.pools, self.redis_url, cfg.namespace,
                                         alive_file=self.run_dir / ALIVE_FILE)
        self.controller.start()
        if cfg.gateway:
            self._start_gateway()
        self._remember_descendants()

    def _start_gateway(self) -> None:
        cfg = self.cfg
        port = cfg.port or free_port(cfg.host)
        grpc_port = free_port(cfg.host) if cfg.grpc_port == -1 else cfg.grpc_port
        assert self.redis_url is not None
        gcfg = gateway_config(cfg, self.redis_url, port, grpc_port)
        assert self.secret_file is not None
        self.gateway = GatewayProcess(gcfg, self.run_dir, self.secret_file)
        self.gateway.start()
        self.gateway.wait_ready(timeout_s=120)

    def _start_ray(self) -> None:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.cfg.ray_address:
            ray.init(address=self.cfg.ray_address, namespace=self.cfg.namespace,
                     log_to_driver=False)
            return
        workers = len(plan_workers(self.cfg))
        self._ray_session_dir = ray_session_dir(self.run_dir)
        # Custom resources the pools ask for (e.g. {"prefill": 1}) exist on a local node too,
        # with room for pools to grow to 4x their planned size.
        custom: dict[str, float] = {}
        for _, pool, _ in plan_workers(self.cfg):
            for name, amount in pool.resources.items():
                custom[name] = custom.get(name, 0.0) + 4 * amount
        ray.init(
            resources=custom or None,
            num_cpus=self.cfg.local_ray_num_cpus or max(os.cpu_count() or 1, 4 * workers),
            include_dashboard=False,
            _temp_dir=str(self._ray_session_dir),
            namespace=self.cfg.namespace,
            log_to_driver=False,
        )
        self._ray_started = True

    def _remember_descendants(self) -> None:
        try:
            me = psutil.Process()
            self._descendants |= {p.pid for p in me.children(recursive=True)}
        except psutil.Error:
            pass
        self._shm_segments |= segments_mapped_by_children()

    def stop(self) -> None:
        """Stop everything, newest first; then make sure no descendant survives."""
        self._remember_descendants()
        if self.redis_supervisor:
            self.redis_supervisor.stop()  # from here on a dead Redis stays dead
        if self.gateway:
            self.gateway.stop()
        keep = bool(self.cfg.keep_workers_on_stop and self.pools and self.pools.detached)
        if self.controller:
            self.controller.stop(keep_sizes=keep)
        if self.pools and keep:
            log.info("leaving %d workers serving for the next controller: %s",
                     len(self.pools.workers), [w.cfg.worker_id for w in self.pools.workers])
        elif self.pools:
            self.pools.stop()
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            log.warning("ray.shutdown failed", exc_info=True)
        if self.redis:
            self.redis.stop()
        self._sweep()
        if self._ray_session_dir is not None:  # Ray is gone: its logs join the run directory
            settle_ray_session_dir(self.run_dir, self._ray_session_dir)

    def _sweep(self) -> None:
        """Kill any process this cluster started that is still alive (by PID)."""
        survivors = []
        for pid in self._descendants:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(p)
            except psutil.Error:
                continue
        for p in survivors:
            try:
                p.terminate()
            except psutil.Error:
                pass
        kill_survivors(survivors, timeout_s=5)
        if survivors:
            log.info("stopped %d leftover processes", len(survivors))
        # Workers unlink their engines' shared memory when they stop cleanly; one that was
        # killed (or timed out) cannot: remove what any engine of this cluster mapped.
        if removed := unlink_segments(self._shm_segments):
            log.info("removed %d shared-memory segments left by stopped engines", len(removed))


def _publish_state(cluster: Cluster, cfg: ClusterConfig) -> Path | None:
    """Write the state file `status` and `scale` find this cluster by (state_file.py)."""
    gw = cluster.gateway
    assert cluster.redis_url is not None
    state = ClusterState(
        namespace=cfg.namespace, redis_url=cluster.redis_url,
        private_redis=cluster.redis is not None, http=gw.url if gw else "",
        grpc=f"{cfg.host}:{gw.cfg.grpc_port}" if gw and gw.cfg.grpc_port else "",
        run_dir=str(cluster.run_dir), pid=os.getpid(),
        pid_started_at=process_started_at(os.getpid()))
    try:
        return write_state(state)
    except OSError as exc:  # a read-only home: serve anyway, status then needs --redis-url
        log.warning("could not write the cluster state file (%s); `splitserve status` and "
                    "`scale` will need --redis-url", exc)
        return None


def run_up(cfg: ClusterConfig) -> int:
    """Start a cluster, print where it serves, and run until SIGINT/SIGTERM."""
    cluster = Cluster(cfg)
    stop = threading.Event()
    state_path: Path | None = None

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # While starting, a signal interrupts the start-up (then everything started is stopped);
    # once serving, it ends the wait below.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        cluster.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        assert cluster.pools is not None
        roles = {}
        for w in cluster.pools.workers:
            roles[w.cfg.role.value] = roles.get(w.cfg.role.value, 0) + 1
        pools = ",".join(f"{k}={v}" for k, v in roles.items())
        gw = cluster.gateway
        grpc = f" grpc={cfg.host}:{gw.cfg.grpc_port}" if gw and gw.cfg.grpc_port else ""
        print(f"splitserve ready: http={gw.url if gw else 'off'}{grpc} mode={cfg.mode} "
              f"workers={pools} model={cfg.engine.name} redis={cluster.redis_url} "
              f"run_dir={cluster.run_dir}", flush=True)
        state_path = _publish_state(cluster, cfg)
        stop.wait()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        print("splitserve: stopping", flush=True)
        if state_path is not None:
            remove_state(state_path)
        cluster.stop()
        print("splitserve: stopped", flush=True)
