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
from services.gateway.serving_pools import ServingPool, load_changes
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
        order = self._orders.get(w.role)
        if order is None:
            order = self._orders[w.role] = LoadOrder()
        order.set(w.worker_id, queue_depth(w, self.directory.in_flight))

    def _sync(self) -> None:
        d = self.directory
        moved = self._moved
        if d.workers is not self._snapshot or moved.all_moved:  # a new registry snapshot
            pools = d.pools()
            if moved.all_moved or self._snapshot is None:
                changes = None
            elif pools.after is self._snapshot:  # the pools know what changed since
                changes = pools.changes
            else:
                changes = load_changes(self._snapshot, pools.snapshot)
            self._snapshot = pools.snapshot
            if changes is None:
                self._arrange(every=moved.all_moved)
                moved.all_moved = False
            else:  # the same workers, some loads changed: those are set again
                info = self._info
                for wid, w in changes.items():
                    if wid in info:
                        info[wid] = w
                        self._set(w)
        if moved:  # this gateway's in-flight counts that moved
            info = self._info
            for wid in moved:
                if (w := info.get(wid)) is not None:
                    self._set(w)
            moved.clear()

    def _arrange(self, every: bool) -> None:
        """Every serving worker of a new snapshot whose pool may have changed: those gone
        dropped, those whose info is not the same object as before set again (all of them
        when ``every``)."""
        old = self._info
        info = {w.worker_id: w for w in self.directory.workers
                if w.state == WorkerState.SERVING}
        for wid, was in old.items():
            now = info.get(wid)
            if now is None or now.role != was.role:
                self._orders[was.role].discard(wid)
        self._info = info
        for wid, w in info.items():
            if every or old.get(wid) is not w:
                self._set(w)

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
