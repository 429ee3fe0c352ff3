"""The gateway's view of the live workers: a registry snapshot refreshed in the background
(or, with a registry feed, the registry's change log followed: router/registry_feed.py), and
the gateway's own in-flight count and dispatches per worker.

With Redis away (down, or silent) the snapshot stays as it was and routing goes on with it;
each refresh is bounded by `health.deadline_s` and its outcome tells `health` (shared with the
request path's prefix-index lookups) whether Redis answers."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from typing import Iterator

from redis.asyncio import Redis

from router.dispatch_ledger import DispatchLedger
from router.redis_client import RedisHealth, stop_task
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole, WorkerState
from router.registry_feed import RegistryFeed
from router.replica_config import RegistryFeedConfig
from services.cluster_secret import ClusterSecret
from services.controller.pool_sizes import PoolSizes
from services.gateway.in_flight import InFlightCounts
from services.gateway.serving_pools import ServingPools

log = logging.getLogger(__name__)

#: with a registry feed, how often the directory looks at the feed's view (a local read)
FEED_VIEW_S = 0.05
#: how long a snapshot without any worker is not believed, after one with serving workers:
#: every worker gone at once is what a Redis that restarted empty shows until the workers'
#: next heartbeats register them again (about a second), not a dead pool
EMPTIED_GRACE_S = 10.0


class WorkerDirectory:
    """Live workers by role."""

    def __init__(self, redis: Redis, namespace: str, model: str, secret: ClusterSecret,
                 refresh_s: float = 0.5, health: RedisHealth | None = None,
                 feed: RegistryFeedConfig | None = None) -> None:
        """``feed``: follow the registry's change log, and re-read the whole registry (every
        ``refresh_s``) only while the feed is not synced; None: re-read it every
        ``refresh_s``."""
        #: the cluster secret: the engine links' keys derive from it (services/link.py)
        self.secret = secret
        self.registry = WorkerRegistry(redis, namespace)
        self.health = health or RedisHealth(pause_s=2.0, deadline_s=1.0)
        self.pool_sizes = PoolSizes(redis, namespace)
        self.model = model
        self.refresh_s = refresh_s
        self.workers: list[WorkerInfo] = []
        #: requests this gateway has in flight per worker (and which counts moved)
        self.in_flight = InFlightCounts()
        self._pools = ServingPools([])
        #: this gateway's dispatches since the workers' last heartbeats (the kv cost model)
        self.ledger = DispatchLedger()
        self._task: asyncio.Task | None = None
        self._refreshed = asyncio.Event()
        self._serving_seen_at = float("-inf")  # when a snapshot last had a serving worker
        self._emptied = False  # an empty snapshot is being held off (see take)
        #: the registry's change log followed, or None (polled)
        self.feed = RegistryFeed(redis, namespace, feed) if feed is not None else None
        self._feed_started = False
        self._feed_seen = (-1, float("-inf"))  # the feed's version taken last, and when

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)
        if self.feed is not None:
            await self.feed.stop()

    async def refresh(self) -> None:
        """Re-read the registry now (a probe of Redis: tried even while `health` pauses)."""
        self.take(await self.health.call(self.registry.live_workers, probe=True))

    def take(self, workers: list[WorkerInfo]) -> None:
        """Take a registry snapshot (the live workers), as a refresh or the registry feed
        gives it; the gateway's other readers see it at once. A snapshot with no worker at
        all, within EMPTIED_GRACE_S of one with serving workers, is not taken: the registry
        lost them all at once (its Redis restarted empty), and requests in flight on them
        must not be moved, nor new ones refused, before they register again."""
        mine = [w for w in workers if w.model == self.model]
        if not mine and self.workers and (
                time.monotonic() - self._serving_seen_at < EMPTIED_GRACE_S):
            if not self._emptied:
                log.warning("the registry lists no worker at all; keeping the last snapshot "
                            "for up to %g s (a Redis that restarted empty: the workers "
                            "register again on their next heartbeat)", EMPTIED_GRACE_S)
                self._emptied = True
            self._refreshed.set()
            return
        self._emptied = False
        self.workers = mine
        if any(w.state == WorkerState.SERVING for w in self.workers):
            self._serving_seen_at = time.monotonic()
        self._refreshed.set()

    async def _from_feed(self) -> bool:
        """With a synced feed, take its view when it changed (or every ``refresh_s``, for the
        workers whose TTL ran out); False when there is no feed or it is not synced (it is
        started here, again after a failed start)."""
        feed = self.feed
        if feed is None:
            return False
        if not self._feed_started:
            try:
                await feed.start()
            except Exception as exc:
                log.warning("registry feed could not start (%s: %s); polling the registry",
                            type(exc).__name__, exc)
                return False
            self._feed_started = True
        if not feed.synced():
            return False
        now = time.monotonic()
        if feed.version != self._feed_seen[0] or now - self._feed_seen[1] >= self.refresh_s:
            self._feed_seen = (feed.version, now)
            self.take(feed.live(now))
        return True

    async def _loop(self) -> None:
        while True:
            try:
                if await self._from_feed():
                    await asyncio.sleep(FEED_VIEW_S)
                    continue
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

    def pools(self) -> ServingPools:
        """The serving pools of the current snapshot (services/gateway/serving_pools.py),
        arranged once per snapshot."""
        if self._pools.snapshot is not self.workers:
            self._pools = ServingPools.of(self.workers, self._pools)
        return self._pools

    def by_role(self, *roles: WorkerRole) -> list[WorkerInfo]:
        """Serving workers of these roles (draining ones take no new requests)."""
        return [w for w in self.workers if w.role in roles and w.state == WorkerState.SERVING]

    @property
    def can_decode(self) -> bool:
        """Whether a decode-capable worker serves (role decode or both)."""
        return bool(self.by_role(WorkerRole.DECODE, WorkerRole.BOTH))

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
