"""Which workers of a pool the route stage lets the kv policy score: the holders of the
prompt's longest cached prefixes plus the least loaded (router/shortlist.py), not the whole
pool, once the pool is larger than that.

The least loaded come from one :class:`~router.shortlist.LoadOrder` per role, kept here from
the gateway's worker directory: on a new registry snapshot every serving worker's load is set
again (a no-op where it did not move) and the workers gone are dropped; between snapshots only
the workers whose in-flight count this gateway changed since the previous decision are set
again (the directory's counts tell who moved: services/gateway/in_flight.py). A worker's load
is its requests ahead (router/cost_model.py `queue_depth`). Nothing a decision does here
visits the whole pool: the kept workers are put back in the pool's order by their positions
(services/gateway/serving_pools.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from router.cost_model import queue_depth
from router.registry import WorkerInfo, WorkerRole, WorkerState
from router.shortlist import LoadOrder, shortlist
from services.gateway.serving_pools import ServingPool
from services.gateway.worker_directory import WorkerDirectory


class PoolShortlist:
    """The kv policy's candidates among a pool's serving workers."""

    def __init__(self, directory: WorkerDirectory, holders: int, least_loaded: int) -> None:
        self.directory = directory
        self.holders = holders
        self.least_loaded = least_loaded
        self._orders: dict[WorkerRole, LoadOrder] = {}
        self._info: dict[str, WorkerInfo] = {}
        self._snapshot: list[WorkerInfo] | None = None
        #: workers whose in-flight count moved since the last sync
        self._moved = directory.in_flight.watch()

    @property
    def size(self) -> int:
        """Pools of at most this many workers are scored whole."""
        return self.holders + self.least_loaded

    def _set(self, w: WorkerInfo) -> None:
        self._orders.setdefault(w.role, LoadOrder()).set(
            w.worker_id, queue_depth(w, self.directory.in_flight))

    def _sync(self) -> None:
        d = self.directory
        moved = self._moved
        if d.workers is not self._snapshot or moved.all_moved:  # a new registry snapshot
            self._snapshot = d.workers
            moved.clear()
            moved.all_moved = False
            info = {w.worker_id: w for w in d.workers if w.state == WorkerState.SERVING}
            for wid, old in self._info.items():
                new = info.get(wid)
                if new is None or new.role != old.role:
                    self._orders[old.role].discard(wid)
            self._info = info
            for w in info.values():
                self._set(w)
            return
        if moved:  # between snapshots only this gateway's in-flight counts move
            for wid in moved:
                if (w := self._info.get(wid)) is not None:
                    self._set(w)
            moved.clear()

    def candidates(self, pool: ServingPool, cached: Mapping[str, int],
                   exclude: Collection[str] = frozenset()) -> list[WorkerInfo]:
        """The workers of one pool (its serving workers, those in `exclude` left out) the
        policy scores, in the pool's order: all of them when they are at most `size`;
        otherwise those holding the longest prefixes (`cached`: worker id -> blocks, the
        index's and the dispatch ledger's, excluded workers left out) and the least loaded
        (as many more as excluded workers sit in the pool)."""
        if len(pool) - pool.excluded(exclude) <= self.size:
            return list(pool.without(exclude))
        self._sync()
        order = self._orders.get(pool.role) if pool.role is not None else None
        if order is None:
            return list(pool.without(exclude))
        gone = sum(1 for wid in exclude if wid in order) if exclude else 0
        keep = shortlist(cached, order, holders=self.holders,
                         least_loaded=self.least_loaded + gone)
        out = pool.in_order([wid for wid in keep if wid not in exclude] if exclude else keep)
        return out or list(pool.without(exclude))
