"""A gateway's own dispatches, for the load its workers have not reported yet.

A worker publishes its load with every heartbeat, so the registry's figures are up to a
heartbeat plus a registry refresh old (about 1 s). What the gateway itself sent since is known
here, exactly and at once: for each worker, the requests this gateway has there that have not
produced their first token yet (and the prompt tokens each will compute, as the router
predicted them), and those decoding.

It also knows which prompts it sent where before any engine has published their blocks: a
worker's engine registers a prompt's blocks in its prefix cache when it schedules the prompt,
but the index learns them only from the events published after that step. So the ledger keeps
the block hashes of the prompts being computed on each worker (`pending_prefixes`): a request
sharing a prefix with one of them (the same system prompt or document, sent a moment later) is
priced as the engine will serve it, from that cache, instead of as a cold prefill elsewhere.

The worker's published figures include this gateway's requests too. To count each request
once, :meth:`DispatchLedger.view` also says how much of this gateway's own work was pending
at the moment of the worker's snapshot (its `updated_at`): the rest of the published figure
is other gateways' work (see router/cost_model.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from itertools import chain, islice, takewhile
from typing import Callable, Container, Iterable, Sequence


_LATER_MIN = 1 << 16  # blocks the superset of later blocks may hold before it is remade


@dataclass(frozen=True)
class OwnLoad:
    """This gateway's requests on one worker, now and at the worker's last snapshot."""

    pending_reqs: int = 0
    """requests waiting for their first token"""
    pending_uncached_tokens: int = 0
    """prompt tokens they compute there, as predicted (cached prefix left out)"""
    decoding_reqs: int = 0
    """requests past their first token"""
    snapshot_pending_reqs: int = 0
    """requests that were waiting for their first token at the worker's snapshot"""
    snapshot_pending_prompt_tokens: int = 0
    """their prompt tokens (whole prompts: the figure the worker publishes)"""
    snapshot_decoding_reqs: int = 0
    """requests that were decoding at the worker's snapshot"""


@dataclass(eq=False)  # compared and hashed as itself (a member of its worker's entries)
class _Entry:
    worker_id: str
    prompt_tokens: int
    uncached_tokens: int
    prefills: bool
    sent_at: float
    first_at: float | None = None
    done_at: float | None = None
    blocks: Sequence[int] = ()
    held: frozenset[int] = frozenset()  # the blocks as a set, while pending


class DispatchLedger:
    """Requests this gateway has sent to each worker, with the times of their first token
    and end; ended ones are kept `history_s` so that a snapshot that old can be matched."""

    def __init__(self, history_s: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._history_s = history_s
        self._open: dict[str, list[_Entry]] = {}
        self._closed: deque[_Entry] = deque()
        # worker -> its entries, open and closed (until pruned): what `view` reads of a worker
        self._of: dict[str, dict[_Entry, None]] = {}
        # worker -> a count of the changes to its entries (never reset), and its last view
        # (that count, the snapshot time it was made for, the load): a worker whose entries
        # did not change is viewed again at the same snapshot time without visiting them
        self._changes: dict[str, int] = {}
        self._views: dict[str, tuple[int, float, OwnLoad]] = {}
        # The pending prompts (sent, not ended) with their block hashes, kept so that a
        # prompt's lookup visits only the workers holding its first block, and a dispatch and
        # its end cost set operations in C, not a step per block:
        self._pending: dict[str, list[frozenset[int]]] = {}  # worker -> its prompts' blocks
        self._union: dict[str, frozenset[int]] = {}  # worker -> all of them (made when asked)
        self._first: dict[int, dict[str, int]] = {}  # first block -> worker -> prompts
        # every block seen after a prompt's first (a superset of the pending ones; remade
        # from the pending prompts when it grows large): a prompt whose first block is not
        # in it can be held only as some pending prompt's first block (block hashes chain:
        # a first block equals a later one only by a collision, and then all are visited)
        self._later: set[int] = set()
        self._later_limit = _LATER_MIN

    def sent(self, request_id: str, worker_id: str, prompt_tokens: int, uncached_tokens: int,
             prefills: bool, blocks: Sequence[int] = ()) -> None:
        """`request_id` went to `worker_id`; `prefills`: the worker computes the prompt there
        (`uncached_tokens` of it; `blocks`: the prompt's block hashes as that worker hashes
        them, known to it until the request ends); otherwise it receives the KV from a
        prefill worker."""
        e = _Entry(worker_id, prompt_tokens, uncached_tokens if prefills else 0, prefills,
                   self._clock(), blocks=blocks if prefills else ())
        self._open.setdefault(request_id, []).append(e)
        self._of.setdefault(worker_id, {})[e] = None
        self._changed(worker_id)
        if e.blocks:
            e.held = frozenset(e.blocks)
            self._pending.setdefault(worker_id, []).append(e.held)
            self._union.pop(worker_id, None)
            first = self._first.setdefault(e.blocks[0], {})
            first[worker_id] = first.get(worker_id, 0) + 1
            later = self._later
            later.update(islice(e.blocks, 1, None))
            if len(later) > self._later_limit:  # forget the blocks of ended prompts
                self._later = set(chain.from_iterable(
                    islice(x.blocks, 1, None) for es in self._open.values() for x in es))
                self._later_limit = max(_LATER_MIN, 4 * len(self._later))

    def pending_prefixes(self, block_hashes: Sequence[int], worker_ids: Container[str]
                         ) -> dict[str, int]:
        """Worker id -> the longest prefix of a prompt (its block hashes, in order), in
        blocks, that a prompt this gateway sent there and that has not ended holds, for the
        workers in `worker_ids` (only the workers with such a prompt holding the prompt's
        first block are visited); workers with none are left out."""
        if not block_hashes:
            return {}
        first = block_hashes[0]
        if first in self._later:  # held after some prompt's first block: look at every worker
            on: Iterable[str] = [w for w in self._pending if first in self._union_of(w)]
        else:
            on = self._first.get(first, ())
        out = {}
        for w in on:
            if w in worker_ids:  # its prefix: the blocks its union holds, from the first (in C)
                out[w] = len(list(takewhile(self._union_of(w).__contains__, block_hashes)))
        return out

    def _changed(self, worker_id: str) -> None:
        self._changes[worker_id] = self._changes.get(worker_id, 0) + 1

    def _union_of(self, worker_id: str) -> frozenset[int]:
        u = self._union.get(worker_id)
        if u is None:
            prompts = self._pending[worker_id]
            u = self._union[worker_id] = (prompts[0] if len(prompts) == 1
                                          else frozenset().union(*prompts))
        return u

    def _release_blocks(self, e: _Entry) -> None:
        if not e.blocks:
            return
        w = e.worker_id
        prompts = self._pending[w]
        prompts.remove(e.held)
        if not prompts:
            del self._pending[w]
        self._union.pop(w, None)
        first = self._first[e.blocks[0]]
        if first[w] > 1:
            first[w] -= 1
        elif len(first) > 1:
            del first[w]
        else:
            del self._first[e.blocks[0]]
        e.blocks, e.held = (), frozenset()

    def first_token(self, request_id: str, worker_id: str) -> None:
        """The request's first token (or, on a prefill worker, its prefill) is done there."""
        for e in self._open.get(request_id, ()):
            if e.worker_id == worker_id and e.first_at is None:
                e.first_at = self._clock()
                self._changed(worker_id)

    def finished(self, request_id: str, worker_id: str | None = None) -> None:
        """The request ended on `worker_id` (None: on every worker it was sent to)."""
        entries = self._open.get(request_id, [])
        now = self._clock()
        keep = []
        for e in entries:
            if worker_id is None or e.worker_id == worker_id:
                e.done_at = now
                self._changed(e.worker_id)
                if e.first_at is None:
                    e.first_at = now
                self._release_blocks(e)
                self._closed.append(e)
            else:
                keep.append(e)
        if keep:
            self._open[request_id] = keep
        else:
            self._open.pop(request_id, None)
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._closed and self._closed[0].done_at is not None and \
                now - self._closed[0].done_at > self._history_s:
            self._forget(self._closed.popleft())

    def _forget(self, e: _Entry) -> None:
        """A closed entry no snapshot can count any more: gone from its worker's entries."""
        of = self._of.get(e.worker_id)
        if of is not None:
            of.pop(e, None)
            self._changed(e.worker_id)
            if not of:
                del self._of[e.worker_id]

    def view(self, snapshots: dict[str, float]) -> dict[str, OwnLoad]:
        """Worker id -> this gateway's load there; `snapshots`: worker id -> the time of its
        published figures (WorkerLoad.updated_at)."""
        if snapshots:  # ended before every snapshot: no snapshot can count them any more
            oldest = min(snapshots.values())
            while self._closed and (self._closed[0].done_at or 0.0) < oldest:
                self._forget(self._closed.popleft())
        out: dict[str, OwnLoad] = {}
        of, changes, views = self._of, self._changes, self._views
        for w, t in snapshots.items():  # the workers asked about only
            n = changes.get(w, 0)
            last = views.get(w)
            if last is not None and last[0] == n and last[1] == t:
                out[w] = last[2]
                continue
            a = [0] * 6
            for e in of.get(w, ()):
                if e.done_at is None:
                    if e.first_at is None:
                        a[0] += 1
                        a[1] += e.uncached_tokens
                    else:
                        a[2] += 1
                if e.sent_at <= t and (e.done_at is None or e.done_at > t):
                    if e.first_at is None or e.first_at > t:
                        if e.prefills:
                            a[3] += 1
                            a[4] += e.prompt_tokens
                    else:
                        a[5] += 1
            own = out[w] = OwnLoad(*a)
            views[w] = (n, t, own)
        return out
