"""The controller's loop: read desired pool sizes from Redis, reconcile the pools, publish
what it sees. Runs in a thread of its own (with its own asyncio loop) beside `splitserve up`.

Desired sizes found in Redis win over the config's: a controller that restarts after a crash
keeps what `splitserve scale` or the planner set (a clean stop clears them). Redis being away
does not stop healing: the loop keeps the last desired sizes, health-checks
and replaces workers through Ray alone, and writes the desired sizes back if Redis returns
without them (a restart without persistence).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from redis.exceptions import RedisError

from router.redis_client import redis_client

from services.controller.pool_sizes import PoolSizes
from services.controller.pools import WorkerPools

log = logging.getLogger(__name__)


class PoolController:
    """Keeps a cluster's pools at their desired sizes."""

    def __init__(self, pools: WorkerPools, redis_url: str, namespace: str,
                 alive_file: Path | None = None) -> None:
        self.pools = pools
        self.alive_file = alive_file  # touched after every pass (the chart's probes read it)
        self.redis_url = redis_url
        self.namespace = namespace
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unknown_pools_logged: set[str] = set()
        self._keep_sizes = False

    def start(self) -> None:
        """Publish the initial desired sizes and start the loop."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="pool-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0, keep_sizes: bool = False) -> None:
        """End the loop (after the pass in progress); the desired and observed sizes are
        removed from Redis unless `keep_sizes` (workers left for the next controller)."""
        self._keep_sizes = keep_sizes
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.alive_file is not None:
            self.alive_file.unlink(missing_ok=True)

    async def _run(self) -> None:
        redis = redis_client(self.redis_url)
        sizes = PoolSizes(redis, self.namespace)
        interval = self.pools.healing.reconcile_interval_s
        try:
            try:  # the pools Redis has no size for yet (Cluster.start took the others)
                await sizes.init_desired(dict(self.pools.desired), by="controller")
            except RedisError:
                log.warning("cannot publish desired pool sizes yet (Redis away)")
            while not self._stop.is_set():
                redis_ok = await self._read_desired(sizes)
                try:
                    observed = await self.pools.reconcile(redis if redis_ok else None)
                except Exception:
                    log.exception("reconcile pass failed")
                    observed = None
                if redis_ok and observed is not None:
                    try:
                        await sizes.publish_observed(observed)
                    except RedisError:
                        pass
                self.passes += 1
                if self.alive_file is not None:
                    self.alive_file.touch()
                await asyncio.to_thread(self._stop.wait, interval)
            if not self._keep_sizes:
                try:
                    await sizes.clear()
                except RedisError:
                    pass
        finally:
            await redis.aclose()

    async def _read_desired(self, sizes: PoolSizes) -> bool:
        """Take desired sizes from Redis; restore ours if Redis lost them. False: Redis away."""
        try:
            desired = await sizes.desired()
        except RedisError:
            return False
        missing = {p: n for p, n in self.pools.desired.items() if p not in desired}
        if missing:
            try:
                await sizes.set_desired(missing, by="controller-restore")
            except RedisError:
                return False
        for pool, n in desired.items():
            if pool not in self.pools.desired:
                if pool not in self._unknown_pools_logged:
                    log.warning("desired size for pool %r ignored: this cluster's pools are %s",
                                pool, ", ".join(self.pools.desired))
                    self._unknown_pools_logged.add(pool)
                continue
            if n != self.pools.desired[pool]:
                log.info("pool %s: desired size %d -> %d", pool, self.pools.desired[pool], n)
                self.pools.desired[pool] = n
        return True


def desired_in_redis(redis_url: str, namespace: str, pools: list[str]) -> dict[str, int]:
    """The desired sizes Redis holds for `pools` (an earlier controller's, or set by
    `splitserve scale` or the planner); {} when it holds none or cannot be reached."""

    async def read() -> dict[str, int]:
        redis = redis_client(redis_url)
        try:
            return await PoolSizes(redis, namespace).desired()
        finally:
            await redis.aclose()

    try:
        found = asyncio.run(read())
    except (RedisError, OSError) as exc:
        log.warning("cannot read desired pool sizes (%s); starting with the configured ones",
                    exc)
        return {}
    return {p: n for p, n in found.items() if p in pools}
