"""Routing policies: which prefill and decode workers serve a request.

A policy sees the live workers (from the registry, with the gateway's own in-flight counts),
and, if it asks for them, every worker's longest cached prefix of the prompt from the prefix
index. It returns a RouteDecision; `prefill=None` means the decode (or `both`) worker computes
the prompt itself and no KV moves.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from pydantic import BaseModel, Field

from router.registry import WorkerInfo, WorkerRole


class NoWorkersError(RuntimeError):
    """No live worker can serve the request right now."""


@dataclass(frozen=True)
class RouteRequest:
    """What a policy knows about the request being routed."""

    num_tokens: int
    """Prompt length in tokens."""
    cached_blocks: Mapping[str, int] = field(default_factory=dict)
    """Worker id -> longest prefix of the prompt (in KV blocks) the worker holds."""
    in_flight: Mapping[str, int] = field(default_factory=dict)
    """Worker id -> requests this gateway has in flight on it."""


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes."""

    decode: WorkerInfo
    prefill: WorkerInfo | None = None
    reason: str = ""
    predicted_cached_blocks: int = 0
    """Cached prefix (blocks) on the worker that will compute the prompt."""

    @property
    def outcome(self) -> str:
        """`remote_prefill` (KV moves) or `local_prefill`."""
        return "remote_prefill" if self.prefill is not None else "local_prefill"


class RoutingPolicy(Protocol):
    """Chooses workers for a request."""

    name: str
    uses_prefix_index: bool

    def choose(self, prefill: Sequence[WorkerInfo], decode: Sequence[WorkerInfo],
               req: RouteRequest) -> RouteDecision: ...


def decision_is_forced(prefill: Sequence[WorkerInfo], decode: Sequence[WorkerInfo]) -> bool:
    """Whether only one route is possible whatever the workers hold: one decode worker, and
    it is aggregated or there is no prefill worker to hand the prompt to. Such a request
    needs no prefix-index lookup (a Redis round trip on its time to first token)."""
    return len(decode) == 1 and (decode[0].role == WorkerRole.BOTH or not prefill)


def _require(workers: Sequence[WorkerInfo], what: str) -> None:
    if not workers:
        raise NoWorkersError(f"no live {what} worker")


def queue_depth(w: WorkerInfo, in_flight: Mapping[str, int]) -> int:
    """Requests ahead on a worker: the largest of what its engine reports (running + waiting),
    what its API has accepted (all gateways, as of its last heartbeat) and what this gateway
    has in flight on it now (exact, but only this gateway's). Not their sum: the published
    figures already include this gateway's requests, and counting them twice would push
    requests away from the worker holding their cache."""
    engine = w.load.num_running_reqs + w.load.num_waiting_reqs
    return max(engine, w.load.in_flight, in_flight.get(w.worker_id, 0))


class RoundRobinPolicy:
    """Each pool in turn, ignoring cache and load."""

    name = "round_robin"
    uses_prefix_index = False

    def __init__(self) -> None:
        self._prefill = itertools.count()
        self._decode = itertools.count()

    def choose(self, prefill, decode, req) -> RouteDecision:
        _require(decode, "decode")
        d = decode[next(self._decode) % len(decode)]
        if d.role == WorkerRole.BOTH:
            return RouteDecision(decode=d, reason="aggregated")
        if not prefill:  # the prefill pool is empty or healing: decode computes the prompt
            return RouteDecision(decode=d, reason="no_prefill_worker")
        p = prefill[next(self._prefill) % len(prefill)]
        return RouteDecision(decode=d, prefill=p, reason="round_robin")


class RandomPolicy:
    """Uniformly random workers."""

    name = "random"
    uses_prefix_index = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, prefill, decode, req) -> RouteDecision:
        _require(decode, "decode")
        d = self._rng.choice(list(decode))
        if d.role == WorkerRole.BOTH:
            return RouteDecision(decode=d, reason="aggregated")
        if not prefill:  # the prefill pool is empty or healing: decode computes the prompt
            return RouteDecision(decode=d, reason="no_prefill_worker")
        return RouteDecision(decode=d, prefill=self._rng.choice(list(prefill)), reason="random")


class LeastLoadedPolicy:
    """The worker with the fewest requests ahead (engine queue + this gateway's in flight)."""

    name = "least_loaded"
    uses_prefix_index = False

    def choose(self, prefill, decode, req) -> RouteDecision:
        _require(decode, "decode")
        d = min(decode, key=lambda w: (queue_depth(w, req.in_flight), w.worker_id))
        if d.role == WorkerRole.BOTH:
            return RouteDecision(decode=d, reason="aggregated")
        if not prefill:  # the prefill pool is empty or healing: decode computes the prompt
            return RouteDecision(decode=d, reason="no_prefill_worker")
        p = min(prefill, key=lambda w: (queue_depth(w, req.in_flight), w.worker_id))
        return RouteDecision(decode=d, prefill=p, reason="least_loaded")


class KVPolicyConfig(BaseModel):
    """Weights of the KV-aware cost function (see docs/routing.md)."""

    load_weight: float = Field(0.25, ge=0, description=(
        "cost of one request queued on a worker, in units of one whole prompt's prefill: a "
        "worker holding the entire prompt loses to an idle one holding none of it once it has "
        "more than 1/load_weight requests more queued"))
    kv_usage_weight: float = Field(0.5, ge=0, description=(
        "cost of a full KV cache (usage 1.0), same unit: steers away from workers near eviction"))
    temperature: float = Field(0.0, ge=0, description=(
        "0: always the cheapest worker; >0: sample with softmax(-cost / temperature)"))
    local_prefill_tokens: int = Field(64, ge=0, description=(
        "conditional disaggregation: when the prompt part not cached on the chosen decode "
        "worker is at most this many tokens, the decode worker prefills it itself"))
    seed: int | None = Field(None, description="seed of the sampling with temperature > 0")


class KVPolicy:
    """Cached prefix weighed against load: the default policy.

    For a prompt of N tokens and a worker w holding the first c_w of its blocks (block size b):

        uncached(w)     = max(N - c_w * b, 0) / N          fraction of the prompt w must compute
        prefill_cost(w) = uncached(w) + load_weight * queue(w) + kv_usage_weight * kv_usage(w)
        decode_cost(w)  =               load_weight * queue(w) + kv_usage_weight * kv_usage(w)

    queue(w) is the requests ahead on w (see queue_depth). Aggregated workers (`both`) are
    chosen by prefill_cost. In
    disaggregated mode the decode worker is chosen by decode_cost (ties: more cached prefix
    first); if the prompt part it does not hold is at most `local_prefill_tokens`, it prefills
    locally and no KV moves, else the prefill worker is chosen by prefill_cost.
    """

    name = "kv"
    uses_prefix_index = True

    def __init__(self, config: KVPolicyConfig | None = None) -> None:
        self.config = config or KVPolicyConfig()
        self._rng = random.Random(self.config.seed)
        self._ties: dict[WorkerRole, itertools.count] = {}

    def _uncached_tokens(self, w: WorkerInfo, req: RouteRequest) -> int:
        return max(req.num_tokens - req.cached_blocks.get(w.worker_id, 0) * w.block_size, 0)

    def _load_cost(self, w: WorkerInfo, req: RouteRequest) -> float:
        c = self.config
        return c.load_weight * queue_depth(w, req.in_flight) + c.kv_usage_weight * min(
            max(w.load.kv_cache_usage, 0.0), 1.0)

    def prefill_cost(self, w: WorkerInfo, req: RouteRequest) -> float:
        """Work to compute the prompt on w, plus what is queued ahead of it."""
        return self._uncached_tokens(w, req) / max(req.num_tokens, 1) + self._load_cost(w, req)

    def decode_cost(self, w: WorkerInfo, req: RouteRequest) -> float:
        """Load of a worker that would only decode."""
        return self._load_cost(w, req)

    def _pick(self, workers: Sequence[WorkerInfo], costs: Sequence[float],
              prefer: Sequence[float]) -> WorkerInfo:
        t = self.config.temperature
        if t > 0:
            lo = min(costs)
            weights = [math.exp(-(c - lo) / t) for c in costs]
            return self._rng.choices(list(workers), weights=weights)[0]
        best = min(zip(costs, prefer))
        ties = [w for w, c, p in zip(workers, costs, prefer) if (c, p) == best]
        # spread exact ties over the pool instead of piling onto one worker
        counter = self._ties.setdefault(workers[0].role, itertools.count())
        return ties[next(counter) % len(ties)]

    def choose(self, prefill, decode, req) -> RouteDecision:
        _require(decode, "decode")
        cached = [-req.cached_blocks.get(w.worker_id, 0) for w in decode]
        if decode[0].role == WorkerRole.BOTH:
            d = self._pick(decode, [self.prefill_cost(w, req) for w in decode], cached)
            return RouteDecision(decode=d, reason="aggregated",
                                 predicted_cached_blocks=req.cached_blocks.get(d.worker_id, 0))
        d = self._pick(decode, [self.decode_cost(w, req) for w in decode], cached)
        if self._uncached_tokens(d, req) <= self.config.local_prefill_tokens or not prefill:
            reason = "short_uncached_remainder" if prefill else "no_prefill_worker"
            return RouteDecision(decode=d, reason=reason,
                                 predicted_cached_blocks=req.cached_blocks.get(d.worker_id, 0))
        p = self._pick(prefill, [self.prefill_cost(w, req) for w in prefill],
                       [-req.cached_blocks.get(w.worker_id, 0) for w in prefill])
        return RouteDecision(decode=d, prefill=p, reason="kv",
                             predicted_cached_blocks=req.cached_blocks.get(p.worker_id, 0))


POLICIES: dict[str, type] = {p.name: p for p in (KVPolicy, RoundRobinPolicy, RandomPolicy,
                                                  LeastLoadedPolicy)}


def make_policy(name: str, kv: KVPolicyConfig | None = None) -> RoutingPolicy:
    """A policy by name; `kv` configures the kv policy."""
    if name == KVPolicy.name:
        return KVPolicy(kv)
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {sorted(POLICIES)}") from None
