"""The serving workers of one registry snapshot, arranged once for routing.

A routing decision needs the serving prefill workers, the serving decode-capable ones (role
decode, or `both` when no decode worker serves), their ids per hashing scheme (one prefix
lookup per scheme) and, to hand the policy a shortlist in the snapshot's order, each worker's
position. :class:`ServingPools` computes all of that once per snapshot
(services/gateway/worker_directory.py `WorkerDirectory.pools`), so that a decision's own work
does not grow with the pool: a retry's excluded workers are counted and dropped where the
decision needs them (the shortlist, the lookup's eligible workers), not by copying the pool.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence

from router.registry import WorkerInfo, WorkerRole, WorkerState

__all__ = ["Scheme", "ServingPool", "ServingPools", "Without", "scheme_of"]

#: a worker's hashing scheme: (block size, algorithm, seed), as its engine hashes blocks
Scheme = tuple[int, str, str]


def scheme_of(w: WorkerInfo) -> Scheme:
    """The hashing scheme of a worker's engine."""
    return (w.block_size, w.hash_algo, w.hash_seed)


class Without:
    """The ids of ``base`` not in ``exclude`` as a container (membership only): a retry's
    eligible workers without copying the pool's ids."""

    __slots__ = ("base", "exclude")

    def __init__(self, base: Collection[str], exclude: Collection[str]) -> None:
        self.base = base
        self.exclude = exclude

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.base and worker_id not in self.exclude


class ServingPool:
    """The serving workers of one pool (one role), in the snapshot's order."""

    __slots__ = ("workers", "position", "role")

    def __init__(self, workers: Sequence[WorkerInfo]) -> None:
        #: the workers, in the snapshot's order (a tuple: shared by every decision)
        self.workers: tuple[WorkerInfo, ...] = tuple(workers)
        #: worker id -> its position in `workers`
        self.position: dict[str, int] = {w.worker_id: i for i, w in enumerate(self.workers)}
        #: the pool's role (None: empty)
        self.role: WorkerRole | None = self.workers[0].role if self.workers else None

    def __len__(self) -> int:
        return len(self.workers)

    def excluded(self, exclude: Collection[str]) -> int:
        """How many of the pool's workers are in ``exclude`` (a retry's: a few ids)."""
        if not exclude:
            return 0
        position = self.position
        return sum(1 for wid in exclude if wid in position)

    def without(self, exclude: Collection[str]) -> Sequence[WorkerInfo]:
        """The pool's workers not in ``exclude``, in order (the pool's own tuple when none
        of them is excluded)."""
        if not self.excluded(exclude):
            return self.workers
        return [w for w in self.workers if w.worker_id not in exclude]

    def first(self, exclude: Collection[str]) -> WorkerInfo | None:
        """The first worker not in ``exclude`` (None: none)."""
        for w in self.workers:
            if w.worker_id not in exclude:
                return w
        return None

    def in_order(self, worker_ids: Iterable[str]) -> list[WorkerInfo]:
        """The pool's workers among ``worker_ids`` (others ignored), in the pool's order."""
        position = self.position
        at = sorted(position[wid] for wid in worker_ids if wid in position)
        workers = self.workers
        return [workers[i] for i in at]

    def __iter__(self) -> Iterator[WorkerInfo]:
        return iter(self.workers)


class ServingPools:
    """One snapshot's serving workers as a routing decision reads them."""

    __slots__ = ("prefill", "decode", "schemes", "eligible", "snapshot")

    def __init__(self, workers: list[WorkerInfo]) -> None:
        #: the registry snapshot these pools were made from (the directory's list itself)
        self.snapshot = workers
        serving = [w for w in workers if w.state == WorkerState.SERVING]
        decode = [w for w in serving if w.role == WorkerRole.DECODE]
        #: serving prefill workers
        self.prefill = ServingPool([w for w in serving if w.role == WorkerRole.PREFILL])
        #: serving decode workers, or the `both` workers when no decode worker serves
        self.decode = ServingPool(decode or [w for w in serving if w.role == WorkerRole.BOTH])
        schemes: dict[Scheme, list[str]] = {}
        for w in (*self.prefill.workers, *self.decode.workers):
            schemes.setdefault(scheme_of(w), []).append(w.worker_id)
        #: hashing scheme -> the ids of the pools' workers hashing that way, in pool order
        #: (prefill first): one prefix lookup per scheme, normally one
        self.schemes: dict[Scheme, tuple[str, ...]] = {s: tuple(ids) for s, ids in schemes.items()}
        #: the same ids as sets (a lookup's eligible workers)
        self.eligible: dict[Scheme, frozenset[str]] = {s: frozenset(ids)
                                                       for s, ids in schemes.items()}
