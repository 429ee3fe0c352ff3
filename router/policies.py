"""Routing policies: which prefill and decode workers serve a request.

A policy sees the live workers (from the registry, with the gateway's own in-flight counts)
and the prompt's token ids, and returns a RouteDecision. `prefill=None` means the decode (or
`both`) worker computes the prompt itself.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Protocol, Sequence

from router.registry import WorkerInfo, WorkerRole


class NoWorkersError(RuntimeError):
    """No live worker can serve the request right now."""


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes."""

    decode: WorkerInfo
    prefill: WorkerInfo | None = None
    reason: str = ""


class RoutingPolicy(Protocol):
    """Chooses workers for a request."""

    name: str

    def choose(self, prefill: Sequence[WorkerInfo], decode: Sequence[WorkerInfo],
               token_ids: Sequence[int], in_flight: dict[str, int]) -> RouteDecision: ...


def _require(workers: Sequence[WorkerInfo], what: str) -> None:
    if not workers:
        raise NoWorkersError(f"no live {what} worker")


class RoundRobinPolicy:
    """Each pool in turn, ignoring cache and load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._prefill = itertools.count()
        self._decode = itertools.count()

    def choose(self, prefill, decode, token_ids, in_flight) -> RouteDecision:
        _require(decode, "decode")
        d = decode[next(self._decode) % len(decode)]
        if d.role == WorkerRole.BOTH:
            return RouteDecision(decode=d, reason="aggregated")
        _require(prefill, "prefill")
        p = prefill[next(self._prefill) % len(prefill)]
        return RouteDecision(decode=d, prefill=p, reason="remote_prefill")


class RandomPolicy:
    """Uniformly random workers."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, prefill, decode, token_ids, in_flight) -> RouteDecision:
        _require(decode, "decode")
        d = self._rng.choice(list(decode))
        if d.role == WorkerRole.BOTH:
            return RouteDecision(decode=d, reason="aggregated")
        _require(prefill, "prefill")
        return RouteDecision(decode=d, prefill=self._rng.choice(list(prefill)),
                             reason="remote_prefill")


class LeastLoadedPolicy:
    """The worker with the fewest requests (gateway in-flight + engine running/waiting)."""

    name = "least_loaded"

    @staticmethod
    def _load(w: WorkerInfo, in_flight: dict[str, int]) -> tuple[float, str]:
        engine = w.load.num_running_reqs + w.load.num_waiting_reqs
        return (max(engine, w.load.in_flight) + in_flight.get(w.worker_id, 0), w.worker_id)

    def choose(self, prefill, decode, token_ids, in_flight) -> RouteDecision:
        _require(decode, "decode")
        d = min(decode, key=lambda w: self._load(w, in_flight))
        if d.role == WorkerRole.BOTH:
            return RouteDecision(decode=d, reason="aggregated")
        _require(prefill, "prefill")
        p = min(prefill, key=lambda w: self._load(w, in_flight))
        return RouteDecision(decode=d, prefill=p, reason="remote_prefill")


POLICIES = {p.name: p for p in (RoundRobinPolicy, RandomPolicy, LeastLoadedPolicy)}


def make_policy(name: str) -> RoutingPolicy:
    """A policy by name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {sorted(POLICIES)}") from None
