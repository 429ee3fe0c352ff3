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

__all__ = ["Scheme", "ServingPool", "ServingPools", "Without", "load_changes", "scheme_of"]

#: a worker's hashing scheme: (block size, algorithm, seed), as its engine hashes blocks
Scheme = tuple[int, str, str]


def scheme_of(w: WorkerInfo) -> Scheme:
    """The hashing scheme of a worker's engine."""
    return (w.block_size, w.hash_algo, w.hash_seed)


def load_changes(old: Sequence[WorkerInfo], new: Sequence[WorkerInfo]
                 ) -> dict[str, WorkerInfo] | None:
    """The workers of snapshot ``new`` whose info is not the same object as in ``old`` (a
    registry feed keeps the unchanged ones), by id, when they changed nothing but their
    load (the same workers in the same order, with the same role, state and hashing
    scheme); None when the pools themselves changed."""
    if len(old) != len(new):
        return None
    out = {}
    for o, n in zip(old, new):
        if o is not n:
            if (o.worker_id != n.worker_id or o.role != n.role or o.state != n.state
                    or o.block_size != n.block_size or o.hash_algo != n.hash_algo
                    or o.hash_seed != n.hash_seed):
                return None
            out[n.worker_id] = n
    return out


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

    def with_infos(self, infos: dict[str, WorkerInfo]) -> "ServingPool":
        """The same pool with some of its workers' infos replaced (load changes only)."""
        position = self.position
        at = [(position[wid], w) for wid, w in infos.items() if wid in position]
        if not at:
            return self
        workers = list(self.workers)
        for i, w in at:
            workers[i] = w
        out = ServingPool.__new__(ServingPool)
        out.workers, out.position, out.role = tuple(workers), position, self.role
        return out


class ServingPools:
    """One snapshot's serving workers as a routing decision reads them."""

    __slots__ = ("prefill", "decode", "schemes", "eligible", "snapshot", "after", "changes")

    @classmethod
    def of(cls, workers: list[WorkerInfo], previous: "ServingPools | None" = None
           ) -> "ServingPools":
        """The pools of snapshot ``workers``; from ``previous`` (the pools of the snapshot
        before) by replacing the infos that changed when only loads changed (one pass over
        the snapshot, comparing identities), else arranged anew."""
        changes = load_changes(previous.snapshot, workers) if previous is not None else None
        if changes is None or previous is None:
            return cls(workers)
        out = cls.__new__(cls)
        out.snapshot, out.after, out.changes = workers, previous.snapshot, changes
        out.prefill = previous.prefill.with_infos(changes)
        out.decode = previous.decode.with_infos(changes)
        out.schemes, out.eligible = previous.schemes, previous.eligible
        return out

    def __init__(self, workers: list[WorkerInfo]) -> None:
        #: the registry snapshot these pools were made from (the directory's list itself)
        self.snapshot = workers
        #: the snapshot before, when only loads changed since (else None), and the workers
        #: whose info changed (by id)
        self.after: list[WorkerInfo] | None = None
        self.changes: dict[str, WorkerInfo] | None = None
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
