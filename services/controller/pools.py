"""Worker pools as Ray actors: create, start (engines load in parallel), stop."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

from router.registry import WorkerRole
from services.controller.config import ClusterConfig, PoolConfig
from services.worker.actor import WorkerActor
from services.worker.config import WorkerConfig

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    """A worker actor the controller started."""

    cfg: WorkerConfig
    actor: Any
    endpoints: dict | None = None


def _cpu_binding(index: int) -> str:
    """Spread CPU engines over cores, one core each, wrapping around."""
    cores = os.cpu_count() or 1
    return str(index % cores)


def plan_workers(cfg: ClusterConfig) -> list[tuple[WorkerRole, PoolConfig, int]]:
    """(role, pool, index within pool) for every worker a cluster config asks for."""
    if cfg.mode == "aggregated":
        pools = [(WorkerRole.BOTH, cfg.workers)]
    else:
        pools = [(WorkerRole.PREFILL, cfg.prefill), (WorkerRole.DECODE, cfg.decode)]
    return [(role, pool, i) for role, pool in pools for i in range(pool.replicas)]


class WorkerPools:
    """Creates and owns the worker actors of a cluster."""

    def __init__(self, cfg: ClusterConfig, redis_url: str, run_dir) -> None:
        self.cfg = cfg
        self.redis_url = redis_url
        self.run_dir = run_dir
        self.workers: list[WorkerHandle] = []

    def worker_config(self, role: WorkerRole, index: int, global_index: int) -> WorkerConfig:
        """The config of one worker."""
        return WorkerConfig(
            worker_id=f"{role.value}-{index}-{os.urandom(3).hex()}",
            role=role,
            engine=self.cfg.engine,
            host=self.cfg.worker_host,
            redis_url=self.redis_url,
            namespace=self.cfg.namespace,
            run_dir=self.run_dir,
            cache_dir=self.cfg.cache_dir,
            cpu_threads_bind=_cpu_binding(global_index) if self.cfg.engine.device == "cpu"
            else "nobind",
        )

    def start(self, timeout_s: float) -> list[WorkerHandle]:
        """Create every worker actor and wait until all engines serve."""
        remote_cls = ray.remote(WorkerActor)
        for g, (role, pool, i) in enumerate(plan_workers(self.cfg)):
            wcfg = self.worker_config(role, i, g)
            actor = remote_cls.options(
                name=f"splitserve-{wcfg.worker_id}",
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus,
                resources=pool.resources or None,
                max_restarts=0,
                runtime_env={"env_vars": {"PYTHONHASHSEED": wcfg.engine.hash_seed}},
            ).remote(wcfg.model_dump_json())
            self.workers.append(WorkerHandle(wcfg, actor))
        refs = [w.actor.start.remote() for w in self.workers]
        endpoints = ray.get(refs, timeout=timeout_s)
        for w, ep in zip(self.workers, endpoints):
            w.endpoints = ep
            log.info("worker %s ready at %s", w.cfg.worker_id, ep["address"])
        return self.workers

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every worker gracefully (engine shutdown), then kill the actors."""
        refs = [w.actor.stop.remote() for w in self.workers]
        try:
            ray.get(refs, timeout=timeout_s)
        except Exception:
            log.warning("some workers did not stop cleanly", exc_info=True)
        for w in self.workers:
            try:
                ray.kill(w.actor)
            except Exception:
                pass
        self.workers.clear()
