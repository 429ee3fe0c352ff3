"""Which workers a routing decision scores: those holding the prompt's longest prefixes plus the
least loaded, not every worker of the pool.

:class:`LoadOrder` keeps a pool's workers sorted by a load figure as loads change (a heartbeat,
a dispatch, a completion: O(log n) search and one list move each), so the least loaded are read
off its front. :func:`shortlist` takes a lookup's result (workers holding a prefix, with its
length) and returns at most ``holders + least_loaded`` worker ids: the work of a decision is
bounded by the holders of the prompt's first block, never by the pool size.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Collection, Iterator, Mapping

from router.prefix_depths import PrefixDepths

__all__ = ["LoadOrder", "shortlist"]


class LoadOrder:
    """Worker ids sorted by a load figure (ties by id)."""

    def __init__(self) -> None:
        self._load: dict[str, float] = {}
        self._sorted: list[tuple[float, str]] = []

    def set(self, worker_id: str, load: float) -> None:
        """Set (or add) a worker's load."""
        old = self._load.get(worker_id)
        if old == load:
            return
        if old is not None:
            del self._sorted[bisect_left(self._sorted, (old, worker_id))]
        self._load[worker_id] = load
        insort(self._sorted, (load, worker_id))

    def discard(self, worker_id: str) -> None:
        """Forget a worker (gone from the pool)."""
        old = self._load.pop(worker_id, None)
        if old is not None:
            del self._sorted[bisect_left(self._sorted, (old, worker_id))]

    def load(self, worker_id: str) -> float | None:
        """A worker's load (None: not in the pool)."""
        return self._load.get(worker_id)

    def least_loaded_of(self, workers: Collection[str], k: int) -> list[str]:
        """The ``k`` least loaded of ``workers`` (all in this order), least loaded first."""
        if k <= 0:
            return []
        if len(workers) * 16 < len(self._load):  # few: sort them
            load = self._load
            return sorted(workers, key=lambda w: (load[w], w))[:k]
        want = workers if isinstance(workers, (set, frozenset, dict)) else set(workers)
        out = []
        for _, w in self._sorted:  # many: about k x len(self) / len(workers) steps
            if w in want:
                out.append(w)
                if len(out) == k:
                    break
        return out

    def ascending(self) -> Iterator[str]:
        """Worker ids, least loaded first."""
        for _, w in self._sorted:
            yield w

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._load

    def __len__(self) -> int:
        return len(self._load)


def shortlist(cached: Mapping[str, int], order: LoadOrder, *, holders: int = 4,
              least_loaded: int = 2) -> list[str]:
    """The workers worth scoring, at most ``holders + least_loaded``.

    ``cached``: worker id -> longest cached prefix (blocks), for workers holding one (others
    may be left out). Taken: the ``holders`` workers with the longest prefixes (among those
    tied at the cut, the least loaded), then the ``least_loaded`` least-loaded workers of
    ``order`` not taken yet. Workers not in ``order`` (not in the pool) are never taken.
    A lookup's :class:`~router.prefix_depths.PrefixDepths` is read level by level, longest
    first, so that only the levels taken are visited.
    """
    load = order._load
    out: dict[str, None] = {}
    if isinstance(cached, PrefixDepths) and cached.levels_valid:
        need = holders
        for _, ws in cached.levels:
            if need <= 0:
                break
            inside = load.keys() & ws  # those in the pool (a set)
            if len(inside) <= need:
                out.update(dict.fromkeys(sorted(inside, key=lambda w: (load[w], w))))
                need -= len(inside)
            else:  # the cut falls in this level: its least loaded
                out.update(dict.fromkeys(order.least_loaded_of(inside, need)))
                need = 0
    else:
        held = {w: d for w, d in cached.items() if d > 0 and w in load} if cached else {}
        if len(held) <= holders:
            out = dict.fromkeys(sorted(held, key=held.__getitem__, reverse=True))
        elif holders > 0:
            cut = heapq.nlargest(holders, held.values())[-1]
            out = dict.fromkeys(w for w, d in held.items() if d > cut)
            tied = [w for w, d in held.items() if d == cut]
            out.update(dict.fromkeys(order.least_loaded_of(tied, holders - len(out))))
    extra = least_loaded
    for _, w in order._sorted:
        if extra <= 0:
            break
        if w not in out:
            out[w] = None
            extra -= 1
    return list(out)
