"""Which workers of a pool the route stage lets the kv policy score: the holders of the
prompt's longest cached prefixes plus the least loaded (router/shortlist.py), not the whole
pool, once the pool is larger than that.

The least loaded come from one :class:`~router.shortlist.LoadOrder` per role, kept here from
the gateway's worker directory: on a new registry snapshot every serving worker's load is set
again (a no-op where it did not move) and the workers gone are dropped; between snapshots only
the workers whose in-flight count this gateway may have changed (those with requests in flight
now or at the previous decision) are set again. A worker's load is its requests ahead
(router/cost_model.py `queue_depth`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from router.cost_model import queue_depth
from router.registry import WorkerInfo, WorkerRole, WorkerState
from router.shortlist import LoadOrder, shortlist
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
        self._flying: set[str] = set()

    @property
    def size(self) -> int:
        """Pools of at most this many workers are scored whole."""
        return self.holders + self.least_loaded

    def _set(self, w: WorkerInfo) -> None:
        self._orders.setdefault(w.role, LoadOrder()).set(
            w.worker_id, queue_depth(w, self.directory.in_flight))

    def _sync(self) -> None:
        d = self.directory
        if d.workers is not self._snapshot:  # a new registry snapshot
            self._snapshot = d.workers
            info = {w.worker_id: w for w in d.workers if w.state == WorkerState.SERVING}
            for wid, old in self._info.items():
                new = info.get(wid)
                if new is None or new.role != old.role:
                    self._orders[old.role].discard(wid)
            self._info = info
            for w in info.values():
                self._set(w)
        flying = set(d.in_flight)
        for wid in flying | self._flying:
            if (w := self._info.get(wid)) is not None:
                self._set(w)
        self._flying = flying

    def candidates(self, workers: Sequence[WorkerInfo], cached: Mapping[str, int],
                   exclude: frozenset[str] = frozenset()) -> list[WorkerInfo]:
        """The workers of one pool (`workers`: one role, the serving ones not in `exclude`)
        the policy scores: all of them when they are at most `size`; otherwise those holding
        the longest prefixes (`cached`: worker id -> blocks, the index's and the dispatch
        ledger's) and the least loaded (as many more as excluded workers sit in the pool)."""
        if len(workers) <= self.size:
            return list(workers)
        self._sync()
        order = self._orders.get(workers[0].role)
        if order is None:
            return list(workers)
        gone = sum(1 for wid in exclude if wid in order)
        keep = set(shortlist(cached, order, holders=self.holders,
                             least_loaded=self.least_loaded + gone))
        out = [w for w in workers if w.worker_id in keep]
        return out or list(workers)
