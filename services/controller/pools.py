"""Worker pools as Ray actors, kept at their desired sizes: start, health, replace, drain.

Every worker is a Ray actor (services/worker/actor.py) owning one vLLM engine. The controller
calls :meth:`WorkerPools.reconcile` every ``reconcile_interval_s``; one pass

1. collects finished start-ups and drains,
2. health-checks every serving worker (an actor call with a timeout): a dead actor, a dead
   engine, or ``unhealthy_after`` failed checks in a row (hung) gets the worker replaced —
   its actor and engine processes are killed, its registry and prefix-index entries and its
   shared memory are removed, so routers forget it at once and peers drop its NIXL agent,
3. starts or drains workers until each pool has its desired size (a pool that keeps failing
   is restarted with exponential backoff).

Worker ids are never reused: a replacement is a new NIXL engine with a new id.

When `up` joins a Ray cluster (`ray_address`), worker actors and their placement groups are
detached: they outlive this controller, and the next controller of the namespace adopts them
(services/controller/adoption.py) instead of starting new engines. With a local Ray (which
ends with `up`) they are owned by this process. Either way `stop()` stops every worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import socket

import psutil
import ray
import ray.util
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from redis.asyncio import Redis

from router.prefix_index import PrefixIndex
from router.redis_client import index_redis_client, redis_client, redis_env
from services.cluster_secret import ClusterSecret
from router.registry import WorkerRegistry, WorkerRole
from services.controller.adoption import (FoundWorker, actor_name, find_workers,
                                          placement_group_of, refusal)
from services.controller.config import ClusterConfig, PoolConfig
from services.controller.healing import HealingConfig
from services.controller.pool_sizes import PoolObservation
from services.processes import kill_tree_leaving_trackers
from services.worker.actor import WorkerActor, worker_pid_file
from services.worker.config import EngineConfig, WorkerConfig
from services.worker.engine_args import merged
from services.worker.shm import segments_mapped_by, unlink_segments

log = logging.getLogger(__name__)


class WorkerState(str, Enum):
    """Where a worker actor is in its life."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass
class WorkerHandle:
    """A worker actor the controller started."""

    cfg: WorkerConfig
    actor: Any
    pool: str
    state: WorkerState = WorkerState.STARTING
    endpoints: dict | None = None
    pending: Any = None  # ObjectRef of start() or drain()
    placement_group: Any = None  # its reservation, when the pool uses placement groups
    created_at: float = field(default_factory=time.monotonic)
    serving_since: float = 0.0
    serving_wall: float = 0.0  # time.time() when its endpoints (and PIDs) arrived
    failed_checks: int = 0


def cpu_binding(index: int, engines: int, cores: list[int] | None = None) -> str:
    """The cores (VLLM_CPU_OMP_THREADS_BIND) of CPU engine `index` of `engines` on this host.

    One engine: vLLM's own choice ("auto"), as vLLM's server makes it with its defaults (its
    compute threads on the host's cores, less the ones it keeps for its scheduler). More: the
    host's cores split into `engines` equal, contiguous shares, one per engine, wrapping
    around when there are more engines than cores (engines started later, e.g. replacements
    or a grown pool, take the shares in turn)."""
    if engines <= 1:
        return "auto"
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    share = max(1, len(cores) // engines)
    slots = len(cores) // share
    first = (index % slots) * share
    mine = cores[first:first + share]
    return str(mine[0]) if len(mine) == 1 else ",".join(str(c) for c in mine)


def engine_cores(cfg: ClusterConfig, index: int, engines: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND of engine `index` of `engines`: on a local Ray, a share of
    this host's cores (cpu_binding); when joining a Ray cluster (`ray_address`), the engines
    run on other nodes whose cores this host cannot count, so each takes vLLM's own choice on
    its node ("auto"; one engine per node or pod, as on Kubernetes). GPU engines: "nobind"."""
    if cfg.engine.device != "cpu":
        return "nobind"
    return "auto" if cfg.ray_address else cpu_binding(index, engines)


def pool_engine(engine: EngineConfig, pool: PoolConfig) -> EngineConfig:
    """The engine settings of one pool's workers: the pool's engine arguments over the
    shared ones."""
    if not pool.engine_args:
        return engine
    return engine.model_copy(update={"engine_args": merged(engine.engine_args,
                                                           pool.engine_args)})


def pool_roles(cfg: ClusterConfig) -> dict[str, tuple[WorkerRole, PoolConfig]]:
    """The pools a cluster config has, by name (= worker role)."""
    if cfg.mode == "aggregated":
        return {"both": (WorkerRole.BOTH, cfg.workers)}
    return {"prefill": (WorkerRole.PREFILL, cfg.prefill),
            "decode": (WorkerRole.DECODE, cfg.decode)}


def placement_bundle(pool: PoolConfig) -> dict[str, float] | None:
    """The one bundle a worker's placement group reserves, or None for no group."""
    use = (pool.placement_group == "always"
           or (pool.placement_group == "auto" and pool.num_gpus > 1))
    if not use:
        return None
    bundle = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}


def plan_workers(cfg: ClusterConfig) -> list[tuple[WorkerRole, PoolConfig, int]]:
    """(role, pool, index within pool) for every worker a cluster config starts with."""
    return [(role, pool, i) for role, pool in pool_roles(cfg).values()
            for i in range(pool.replicas)]


def kill_worker_processes(w: "WorkerHandle", run_dir: Path) -> list[int]:
    """SIGKILL a worker's actor process and everything under it (its engine) and remove its
    engine's /dev/shm files, on the worker's own node: here when it runs on this host, else by
    a Ray task pinned to its node (`NodeAffinitySchedulingStrategy`, not soft: on no other
    node). A worker whose node is gone has nothing left to kill. Returns the PIDs killed."""
    ep = w.endpoints or {}
    node_id = ep.get("ray_node_id")
    if node_id and ep.get("node", socket.gethostname()) != socket.gethostname():
        return kill_on_node(node_id, ep, w.cfg.worker_id, run_dir, w.serving_wall)
    return kill_local_worker_processes(ep, w.cfg.worker_id, run_dir, w.serving_wall)


def kill_on_node(node_id: str, ep: dict, worker_id: str, run_dir: Path, serving_wall: float,
                 timeout_s: float = 60.0) -> list[int]:
    """kill_local_worker_processes run by a Ray task on the node `node_id`."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(kill_local_worker_processes).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        name=f"splitserve-kill-{worker_id}")
    try:
        killed: list[int] = ray.get(task.remote(ep, worker_id, run_dir, serving_wall,
                                                on_its_node=True), timeout=timeout_s)
        return killed
    except Exception as exc:  # the node is gone (with the worker), or Ray cannot reach it
        log.warning("could not clean up worker %s on its node %s: %s", worker_id, node_id, exc)
        return []


def kill_local_worker_processes(ep: dict, worker_id: str, run_dir: Path,
                                serving_wall: float, on_its_node: bool = False) -> list[int]:
    """SIGKILL a worker's actor process and everything under it (its engine), on this host.

    The PIDs come from the worker's endpoints `ep` (actor and engine processes, recorded when
    it started serving, at `serving_wall`) and its PID file (written when the actor was
    created, so a worker that never finished starting is covered too). A PID now owned by a
    process created after the worker's actor is skipped (reused). The /dev/shm files its
    engine processes map at that moment, and those its endpoints list, are removed once they
    are dead (none of them can). The actor's multiprocessing resource tracker is left to unlink
    the named semaphores it registered (mapped by nobody) before it is killed too. The PIDs
    of `ep` count when it names this host, or `on_its_node` (run on its Ray node by
    kill_on_node). Returns the PIDs killed.
    """
    # pid -> the latest time the process it names was known to exist
    known: dict[int, float] = {}
    actors: set[int] = set()  # the actor's own process (a Ray worker)
    here = on_its_node or ep.get("node", socket.gethostname()) == socket.gethostname()
    if ep.get("pid") and here:
        actors.add(ep["pid"])
        for pid in [ep["pid"], *ep.get("engine_pids", [])]:
            known[pid] = serving_wall
    pid_file = worker_pid_file(run_dir, worker_id)
    try:
        pid_text, host = pid_file.read_text().split()
        if host == socket.gethostname():
            known.setdefault(int(pid_text), pid_file.stat().st_mtime)
            actors.add(int(pid_text))
    except (OSError, ValueError):
        pass
    procs: dict[int, psutil.Process] = {}
    for pid, seen_at in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() > seen_at + 1.0:
                continue  # the PID was reused by a newer process
            procs[pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            continue
    # the actor is a Ray worker (it maps Ray's own files): only what is under it counts
    mapped = segments_mapped_by([p for pid, p in procs.items() if pid not in actors])
    if here:
        mapped |= {Path(p) for p in ep.get("shm_segments", [])}
    kill_tree_leaving_trackers(list(procs.values()))
    if removed := unlink_segments(mapped):
        log.info("removed %d shared-memory files of %s's engine", len(removed), worker_id)
    pid_file.unlink(missing_ok=True)
    return sorted(procs)


class WorkerPools:
    """Creates, watches, replaces, drains and stops the worker actors of a cluster."""

    def __init__(self, cfg: ClusterConfig, redis_url: str, run_dir: Path,
                 secret: ClusterSecret, healing: HealingConfig | None = None) -> None:
        self.cfg = cfg
        self.secret = secret  # handed to every worker actor in its environment
        self.redis_url = redis_url
        self.run_dir = run_dir
        self.healing = healing or cfg.healing
        self.pools = pool_roles(cfg)
        self.desired: dict[str, int] = {name: pool.replicas
                                        for name, (_, pool) in self.pools.items()}
        self.workers: list[WorkerHandle] = []
        self.restarts: dict[str, int] = {name: 0 for name in self.pools}
        self._failures: dict[str, int] = {name: 0 for name in self.pools}
        self._next_start: dict[str, float] = {name: 0.0 for name in self.pools}
        self._launched = 0
        self._planned_engines = sum(p.replicas for _, p in self.pools.values())
        self._pool_launches: dict[str, int] = {name: 0 for name in self.pools}
        self._remote_cls = ray.remote(WorkerActor)
        self.detached = cfg.ray_address is not None  # workers outlive this controller

    # --- starting -----------------------------------------------------------------------------
    def worker_config(self, role: WorkerRole, pool: PoolConfig, index: int, global_index: int
                      ) -> WorkerConfig:
        """The config of one worker."""
        return WorkerConfig(
            worker_id=f"{role.value}-{index}-{os.urandom(3).hex()}",
            role=role,
            engine=pool_engine(self.cfg.engine, pool),
            host=self.cfg.advertised_host,
            redis_url=self.redis_url,
            namespace=self.cfg.namespace,
            run_dir=self.run_dir,
            cache_dir=self.cfg.cache_dir,
            cpu_threads_bind=engine_cores(self.cfg, global_index, self._planned_engines),
            metrics_port=self.cfg.worker_metrics_port,
        )

    def launch(self, name: str) -> WorkerHandle:
        """Create one worker actor of a pool and begin its start-up (not waited for)."""
        role, pool = self.pools[name]
        index = self._pool_launches[name]
        self._pool_launches[name] += 1
        wcfg = self.worker_config(role, pool, index, self._launched)
        self._launched += 1
        options: dict[str, Any] = dict(
            name=actor_name(wcfg.worker_id),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            resources=pool.resources or None,
            max_restarts=0,
            lifetime="detached" if self.detached else None,
            runtime_env={"env_vars": {
                "PYTHONHASHSEED": wcfg.engine.hash_seed,
                # Ray lowers every worker process's priority by RayConfig.worker_niceness
                # (15) when it starts; the engine processes inherit it. Read from the
                # worker's own environment, so this holds on any Ray cluster.
                "RAY_worker_niceness": str(wcfg.engine.niceness),
                # The Redis client settings of this process (router/redis_config.py).
                **redis_env(),
                # What every caller of the worker's ports must prove (docs/security.md).
                **self.secret.environment(),
            }},
        )
        group = None
        if (bundle := placement_bundle(pool)) is not None:
            # All of the worker's GPUs on one node, reserved as a unit; the engine's own
            # tensor/pipeline-parallel processes run inside the actor's reservation.
            group = ray.util.placement_group([bundle], strategy="STRICT_PACK",
                                             name=actor_name(wcfg.worker_id),
                                             lifetime="detached" if self.detached else None)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=0,
                placement_group_capture_child_tasks=True)
        actor = self._remote_cls.options(**options).remote(wcfg.model_dump_json())
        handle = WorkerHandle(wcfg, actor, name, placement_group=group)
        handle.pending = actor.start.remote()
        self.workers.append(handle)
        log.info("starting worker %s", wcfg.worker_id)
        return handle

    def start(self, timeout_s: float) -> list[WorkerHandle]:
        """Adopt the workers an earlier controller left (detached workers only), create the
        rest of the desired sizes, and wait until every engine that is starting serves."""
        if self.detached:
            self.adopt()
        for name, n in self.desired.items():
            active = [w for w in self.workers if w.pool == name
                      and w.state in (WorkerState.STARTING, WorkerState.SERVING)]
            for _ in range(n - len(active)):
                self.launch(name)
        starting = [w for w in self.workers if w.state == WorkerState.STARTING]
        endpoints = ray.get([w.pending for w in starting], timeout=timeout_s)
        for w, ep in zip(starting, endpoints):
            self._serving(w, ep)
        return list(self.workers)

    def adopt(self) -> list[WorkerHandle]:
        """Take over the live worker actors of this namespace that fit this controller's
        pools (adoption.refusal); remove the others. Serving workers keep serving without a
        pause; one still starting or draining is followed to the end of it."""
        engines = {name: pool_engine(self.cfg.engine, pool)
                   for name, (_, pool) in self.pools.items()}
        adopted: list[WorkerHandle] = []
        rejected: list[tuple[FoundWorker, str]] = []
        for found in find_workers():
            why = refusal(found, engines, self.redis_url, self.cfg.namespace,
                          self.secret.fingerprint)
            if why is not None:
                rejected.append((found, why))
                continue
            adopted.append(self._adopted(found))
        for found, why in rejected:
            log.warning("not adopting %s: %s; removing it", found.name, why)
            self._remove_found(found)
        if rejected:
            ids = [f.config.worker_id for f, _ in rejected if f.config is not None]
            asyncio.run(self._forget(ids))
        if adopted:
            log.info("adopted %d workers: %s", len(adopted),
                     ", ".join(w.cfg.worker_id for w in adopted))
        return adopted

    def _adopted(self, found: FoundWorker) -> WorkerHandle:
        cfg = found.config
        assert cfg is not None and found.description is not None
        pool = cfg.role.value
        w = WorkerHandle(cfg, found.actor, pool, placement_group=placement_group_of(
            cfg.worker_id))
        state = found.state
        if state == "serving":
            self._serving(w, found.description["endpoints"])
        elif state == "draining":
            self.begin_drain(w)  # waits for the drain in progress (WorkerActor.drain)
        else:  # created or starting: start() runs once, a second call waits for it
            w.pending = found.actor.start.remote()
        self.workers.append(w)
        # new workers of the pool take the next index; core shares continue after these
        try:
            index = int(cfg.worker_id.split("-")[1])
        except (IndexError, ValueError):
            index = 0
        self._pool_launches[pool] = max(self._pool_launches[pool], index + 1)
        self._launched += 1
        log.info("adopted worker %s (%s)", cfg.worker_id, state)
        return w

    def _remove_found(self, found: FoundWorker) -> None:
        """Stop a worker actor this controller will not adopt: its processes (on its node,
        when it said where they are), the actor, its placement group."""
        cfg = found.config
        if cfg is not None:
            ep = (found.description or {}).get("endpoints")
            w = WorkerHandle(cfg, found.actor, cfg.role.value, endpoints=ep,
                             serving_wall=time.time())
            kill_worker_processes(w, cfg.run_dir)
        try:
            ray.kill(found.actor, no_restart=True)
        except Exception:
            pass
        if cfg is not None and (group := placement_group_of(cfg.worker_id)) is not None:
            try:
                ray.util.remove_placement_group(group)
            except Exception:
                log.warning("could not remove the placement group of %s", cfg.worker_id)

    def _serving(self, w: WorkerHandle, endpoints: dict) -> None:
        w.endpoints, w.pending = endpoints, None
        w.state = WorkerState.SERVING
        w.serving_since = time.monotonic()
        w.serving_wall = time.time()
        log.info("worker %s ready at %s", w.cfg.worker_id, endpoints["address"])

    # --- reconcile ----------------------------------------------------------------------------
    async def reconcile(self, redis: Redis | None) -> dict[str, PoolObservation]:
        """One pass: collect start-ups and drains, check health, resize. See module doc."""
        await self._collect(redis)
        await self._check_health(redis)
        await self._resize(redis)
        return self.observe()

    async def _collect(self, redis: Redis | None) -> None:
        now = time.monotonic()
        for w in list(self.workers):
            if w.pending is None:
                continue
            ready, _ = ray.wait([w.pending], timeout=0)
            if w.state == WorkerState.STARTING:
                if ready:
                    try:
                        self._serving(w, ray.get(w.pending))
                    except Exception as exc:
                        log.error("worker %s failed to start: %s", w.cfg.worker_id, exc)
                        await self._replace(w, redis, "start-up failed")
                elif now - w.created_at > self.cfg.startup_timeout_s:
                    await self._replace(w, redis, "start-up timed out")
            elif w.state == WorkerState.DRAINING and ready:
                try:
                    log.info("worker %s drained: %s", w.cfg.worker_id, ray.get(w.pending))
                except Exception as exc:
                    log.warning("worker %s failed while draining: %s", w.cfg.worker_id, exc)
                await self._remove(w, redis)
            elif (w.state == WorkerState.DRAINING
                  and now - w.serving_since > self.healing.drain_timeout_s + 30):
                log.warning("worker %s did not finish draining; stopping it", w.cfg.worker_id)
                await self._remove(w, redis)

    async def _check_health(self, redis: Redis | None) -> None:
        serving = [w for w in self.workers if w.state == WorkerState.SERVING]
        if not serving:
            return
        refs = [w.actor.health.remote() for w in serving]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.healing.health_timeout_s)
        ready_set = set(ready)
        now = time.monotonic()
        for w, ref in zip(serving, refs):
            reason = None
            if ref in ready_set:
                try:
                    report = ray.get(ref)
                    if report.get("healthy"):
                        w.failed_checks = 0
                        if now - w.serving_since > self.healing.stable_after_s:
                            self._failures[w.pool] = 0
                        continue
                    reason = f"engine unhealthy: {report.get('message')}"
                except ray.exceptions.RayActorError as exc:
                    reason = f"actor died: {type(exc).__name__}"
                except Exception as exc:
                    reason = f"health call failed: {type(exc).__name__}: {exc}"
                await self._replace(w, redis, reason)
            else:
                ray.cancel(ref, force=False)
                w.failed_checks += 1
                log.warning("worker %s missed a health check (%d in a row)", w.cfg.worker_id,
                            w.failed_checks)
                if w.failed_checks >= self.healing.unhealthy_after:
                    await self._replace(w, redis, "unresponsive")

    async def _resize(self, redis: Redis | None) -> None:
        now = time.monotonic()
        for name, want in self.desired.items():
            active = [w for w in self.workers if w.pool == name
                      and w.state in (WorkerState.STARTING, WorkerState.SERVING)]
            if len(active) < want:
                if now < self._next_start[name]:
                    continue
                for _ in range(want - len(active)):
                    self.launch(name)
            elif len(active) > want:
                for w in self._victims(active, len(active) - want):
                    if w.state == WorkerState.STARTING:
                        log.info("stopping worker %s before it serves", w.cfg.worker_id)
                        await self._remove(w, redis)
                    else:
                        self.begin_drain(w)

    @staticmethod
    def _victims(active: list[WorkerHandle], n: int) -> list[WorkerHandle]:
        """Which workers leave when a pool shrinks: those still starting first, then the
        newest serving ones (the oldest hold the most cache)."""
        order = sorted(active, key=lambda w: (w.state == WorkerState.SERVING, -w.created_at))
        return order[:n]

    def begin_drain(self, w: WorkerHandle) -> None:
        """Take a worker out of service: it finishes its requests, then stops."""
        log.info("draining worker %s", w.cfg.worker_id)
        w.state = WorkerState.DRAINING
        w.pending = w.actor.drain.remote(self.healing.drain_timeout_s)
        w.serving_since = time.monotonic()

    async def _replace(self, w: WorkerHandle, redis: Redis | None, reason: str) -> None:
        """Remove a failed worker; the resize step starts its replacement (with backoff)."""
        log.error("worker %s failed (%s); replacing it", w.cfg.worker_id, reason)
        self.restarts[w.pool] += 1
        self._failures[w.pool] += 1
        n = self._failures[w.pool]
        delay = min(self.healing.backoff_max_s, self.healing.backoff_initial_s * 2 ** (n - 1))
        self._next_start[w.pool] = time.monotonic() + delay
        await self._remove(w, redis)

    async def _remove(self, w: WorkerHandle, redis: Redis | None) -> None:
        """Kill a worker's actor and engine processes and forget it everywhere."""
        if w in self.workers:
            self.workers.remove(w)
        killed = await asyncio.to_thread(kill_worker_processes, w, w.cfg.run_dir)
        try:
            ray.kill(w.actor, no_restart=True)
        except Exception:
            pass
        self._release_group(w)
        log.info("removed worker %s (killed pids %s)", w.cfg.worker_id, killed)
        if redis is not None:
            try:
                await WorkerRegistry(redis, self.cfg.namespace).deregister(w.cfg.worker_id)
                await _clear_index_entries(redis, self.cfg.namespace, [w.cfg.worker_id])
            except Exception:
                log.warning("could not remove %s from Redis (its entries expire)",
                            w.cfg.worker_id, exc_info=True)

    @staticmethod
    def _release_group(w: WorkerHandle) -> None:
        if w.placement_group is not None:
            try:
                ray.util.remove_placement_group(w.placement_group)
            except Exception:
                log.warning("could not remove the placement group of %s", w.cfg.worker_id)
            w.placement_group = None

    def observe(self) -> dict[str, PoolObservation]:
        """Counts per pool, as published to Redis."""
        out = {}
        for name in self.pools:
            ws = [w for w in self.workers if w.pool == name]
            out[name] = PoolObservation(
                serving=sum(w.state == WorkerState.SERVING for w in ws),
                starting=sum(w.state == WorkerState.STARTING for w in ws),
                draining=sum(w.state == WorkerState.DRAINING for w in ws),
                restarts=self.restarts[name])
        return out

    # --- stopping -----------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every worker gracefully (engine shutdown), then kill the actors. A worker that
        did not stop in time is killed by PID and its registry and index entries are removed
        here, so nothing it published outlives the cluster."""
        refs = {w.actor.stop.remote(): w for w in self.workers}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        unclean = [w for ref, w in refs.items() if ref not in done]
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:
                log.warning("worker %s failed to stop: %s", refs[ref].cfg.worker_id, exc)
                unclean.append(refs[ref])
        if unclean:
            log.warning("workers did not stop cleanly within %.0fs: %s", timeout_s,
                        [w.cfg.worker_id for w in unclean])
        for w in self.workers:
            if w in unclean:
                kill_worker_processes(w, w.cfg.run_dir)
            try:
                ray.kill(w.actor)
            except Exception:
                pass
            self._release_group(w)
            ep = w.endpoints or {}
            if ep.get("node", socket.gethostname()) == socket.gethostname():
                unlink_segments({Path(p) for p in ep.get("shm_segments", [])})
        if unclean:
            asyncio.run(self._forget([w.cfg.worker_id for w in unclean]))
        self.workers.clear()

    async def _forget(self, worker_ids: list[str]) -> None:
        """Remove workers' registry and prefix-index entries (best effort: they also expire)."""
        redis = redis_client(self.redis_url)
        try:
            for worker_id in worker_ids:
                await WorkerRegistry(redis, self.cfg.namespace).deregister(worker_id)
            await _clear_index_entries(redis, self.cfg.namespace, worker_ids)
        except Exception:
            log.warning("could not remove %s from Redis (their entries expire)", worker_ids,
                        exc_info=True)
        finally:
            await redis.aclose()


async def _clear_index_entries(redis: Any, namespace: str, worker_ids: list[str]) -> None:
    """Retire workers' prefix-index epochs, on the index's own Redis when one is configured."""
    client = index_redis_client(redis)
    index = PrefixIndex(client, namespace, close_client=client is not redis)
    try:
        for worker_id in worker_ids:
            await index.clear_worker(worker_id)
    finally:
        await index.aclose()
