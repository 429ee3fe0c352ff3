"""Routing policies: which prefill and decode workers serve a request.

A policy sees the live workers (from the registry, with the gateway's own in-flight counts and
dispatches), and, if it asks for them, every worker's longest cached prefix of the prompt from
the prefix index. It returns a RouteDecision; `prefill=None` means the decode (or `both`)
worker computes the prompt itself and no KV moves.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Protocol, Sequence

from pydantic import BaseModel, Field, field_validator

from router.cost_model import PoolSpeed, estimate, queue_depth
from router.dispatch_ledger import OwnLoad
from router.filters import KVHeadroomFilter
from router.plugins import (Candidate, GreedyPicker, Pipeline, Priced, RouteContext,
                            SoftmaxPicker)
from router.registry import WorkerInfo, WorkerRole
from router.route_explanation import CandidateRows
from router.scorers import SCORERS
from router.scorers.cold_spread import AffinityRate
from router.scorers.ttft import TTFTScorer


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
    own: Mapping[str, OwnLoad] | None = None
    """Worker id -> this gateway's own dispatches there (router/dispatch_ledger.py); None:
    the caller keeps no ledger (the published figures and `in_flight` are all there is)."""


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes."""

    decode: WorkerInfo
    prefill: WorkerInfo | None = None
    reason: str = ""
    predicted_cached_blocks: int = 0
    """Cached prefix (blocks) on the worker that will compute the prompt."""
    predicted_cached_tokens: int | None = None
    """The same in prompt tokens as the engine can hit them (router/route_audit.py), set by
    the gateway when the route was chosen with the prefix index; None: no prediction was made
    (a policy that ignores the index, a forced route, or the index unreachable)."""
    cost: float | None = None
    """kv policy: the route's estimated time to first token plus the other scorers' costs
    (seconds once the workers have measured their speed)."""
    ttft_s: float | None = None
    """kv policy: the estimated time from the route to the computing worker's first output
    (the `ttft` scorer alone: the time to first token, or with the KV moving the prefill's
    end), in seconds once the workers have measured their speed; the routing audit logs it
    beside the measured one."""
    candidates: Sequence[dict[str, Any]] = ()
    """kv policy: what the cost model saw of each worker that could compute the prompt (its
    cached tokens, queued prefill tokens, waiting and decoding requests, each scorer's cost
    and the total, seconds): the route's work, for its log line. The policy's rows are
    formatted when first read (router/route_explanation.py: the decision does not pay for
    them); as a sequence they equal the tuple of those rows."""
    prompt_blocks: tuple[int, ...] = ()
    """The prompt's block hashes as the computing worker hashes them (set by the gateway when
    it looked the prompt up): the dispatch ledger remembers them there until the request
    ends, for the requests that follow before the index knows them."""

    @property
    def outcome(self) -> str:
        """`remote_prefill` (KV moves) or `local_prefill`."""
        return "remote_prefill" if self.prefill is not None else "local_prefill"

    @property
    def computes(self) -> WorkerInfo:
        """The worker that computes the prompt (the one the prediction is about)."""
        return self.prefill or self.decode


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
    """The kv policy's cost model and plugins (see docs/routing.md)."""

    load_weight: float = Field(0.25, ge=0, description=(
        "price of a request ahead whose size is unknown (a worker that has not measured its "
        "speed yet, or requests known only as a count), in units of this prompt's whole "
        "prefill: a worker holding the entire prompt loses to an idle one holding none of it "
        "once it has more than 1/load_weight such requests more"))
    kv_usage_weight: float = Field(0.5, ge=0, description=(
        "kv_pressure scorer: cost of a full KV cache (usage 1.0) in units of this prompt's "
        "whole prefill time: steers away from workers near eviction"))
    temperature: float = Field(0.0, ge=0, description=(
        "0: always the cheapest worker; >0: sample with softmax(-cost / (temperature x the "
        "prompt's whole prefill time))"))
    local_prefill_tokens: int = Field(64, ge=0, description=(
        "conditional disaggregation: a decode worker may prefill the prompt part it does not "
        "hold itself when it is at most this many tokens (it does when the estimate says that "
        "is no slower than a prefill worker plus the KV pull); above it, never (a long prefill "
        "stalls the decode worker's streams)"))
    seed: int | None = Field(None, description="seed of the sampling with temperature > 0")
    scorer_weights: dict[str, float] = Field(
        default_factory=lambda: {"ttft": 1.0, "kv_pressure": 1.0, "cold_spread": 1.0,
                                 "shared_step": 1.0},
        description=("scorers (router/scorers) and their weights; each prices a candidate in "
                     "seconds, the weighted sum is the candidate's cost"))
    max_kv_usage: float = Field(1.0, ge=0, le=1, description=(
        "kv_headroom filter: workers whose KV cache is fuller than this are not candidates "
        "(unless all are); 1.0: off"))
    step_tokens: int = Field(2048, ge=1, description=(
        "tokens one engine step computes at most (vLLM's max_num_batched_tokens): a prefill "
        "of more spans several steps, each with the running batch's decode"))
    affinity_half_life_s: float = Field(5.0, gt=0, description=(
        "cold_spread scorer: half-life of the rate of requests routed to a worker for its "
        "cache"))
    shortlist_holders: int = Field(12, ge=0, description=(
        "the gateway scores, per pool, only the workers holding the prompt's longest cached "
        "prefixes (at most this many) plus shortlist_least_loaded more; pools of at most "
        "shortlist_holders + shortlist_least_loaded workers are scored whole"))
    shortlist_least_loaded: int = Field(4, ge=1, description=(
        "the least-loaded workers of a pool (requests ahead) added to the holders the gateway "
        "scores (see shortlist_holders)"))

    @field_validator("scorer_weights")
    @classmethod
    def _known_scorers(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; known: {sorted(SCORERS)}")
        if any(x < 0 for x in v.values()):
            raise ValueError("scorer weights must be >= 0")
        return v


class KVPolicy:
    """Each candidate's estimated time to first token: the default policy.

    The cost model is router/cost_model.py; the plugins (filters, scorers in seconds, a
    picker) are router/plugins.py and router/scorers/. Aggregated workers (`both`): the
    cheapest worker computes the prompt. Disaggregated: the cheapest prefill worker, and for
    each decode worker the cheaper of (that prefill worker's cost + the KV pull to it) and
    (prefilling locally, when the part it does not hold is at most `local_prefill_tokens`);
    the decode worker with the cheapest route wins, and its route is taken.
    """

    name = "kv"
    uses_prefix_index = True

    def __init__(self, config: KVPolicyConfig | None = None) -> None:
        self.config = c = config or KVPolicyConfig()
        scorers = []
        for name, weight in c.scorer_weights.items():
            cls = SCORERS[name]
            scorers.append((cls(c.kv_usage_weight) if name == "kv_pressure" else cls(), weight))
        picker = SoftmaxPicker(c.temperature, c.seed) if c.temperature > 0 else GreedyPicker()
        filters = [KVHeadroomFilter(c.max_kv_usage)] if c.max_kv_usage < 1.0 else []
        self.pipeline = Pipeline(scorers, filters, picker)
        self.affinity = AffinityRate(c.affinity_half_life_s)

    def _context(self, req: RouteRequest, best: int) -> RouteContext:
        """The plugins' context; ``best``: the most prompt tokens a worker of either pool
        holds."""
        c = self.config
        return RouteContext(req.num_tokens, c.load_weight, c.step_tokens, self.affinity.rate,
                            best)

    def candidates(self, workers: Sequence[WorkerInfo], req: RouteRequest, pool: PoolSpeed,
                   computes: bool) -> list[Candidate]:
        """The workers as candidates of one part of the route, with fresh estimates."""
        own = req.own
        get_own = own.get if own is not None else _no_ledger
        cached, n, in_flight = req.cached_blocks.get, req.num_tokens, req.in_flight
        return [Candidate(estimate(w, get_own(w.worker_id), in_flight, pool),
                          min(cached(w.worker_id, 0) * w.block_size, n), computes)
                for w in workers]

    def _note_affinity(self, chosen: Candidate, others: Sequence[Candidate]) -> None:
        rest = [o.cached_tokens for o in others if o.worker_id != chosen.worker_id]
        if chosen.cached_tokens > max(rest, default=0):
            self.affinity.record(chosen.worker_id)

    def _blocks(self, c: Candidate, req: RouteRequest) -> int:
        return req.cached_blocks.get(c.worker_id, 0)

    def choose(self, prefill, decode, req) -> RouteDecision:
        _require(decode, "decode")
        # the pool's mean speed prices the workers that have not measured theirs (if any)
        pool = (PoolSpeed.of([*prefill, *decode])
                if any(w.load.prefill_tokens_per_s <= 0 for w in (*prefill, *decode))
                else _UNUSED_POOL)
        pipe = self.pipeline
        if decode[0].role == WorkerRole.BOTH:
            every = self.candidates(decode, req, pool, True)
            best = max(c.cached_tokens for c in every)
            if prefill:
                n = req.num_tokens
                best = max(best, *(min(req.cached_blocks.get(w.worker_id, 0) * w.block_size,
                                       n) for w in prefill))
            ctx = self._context(req, best)
            cands = pipe.filter(every, ctx)
            priced = pipe.price(cands, ctx)
            i = pipe.pick(cands, priced.costs, ctx)
            d = cands[i]
            self._note_affinity(d, cands)
            return RouteDecision(decode=d.estimate.worker, reason="aggregated",
                                 predicted_cached_blocks=self._blocks(d, req),
                                 cost=priced.costs[i], ttft_s=_TTFT.cost(d, ctx),
                                 candidates=_explain((cands, priced)))
        pevery = self.candidates(prefill, req, pool, True) if prefill else []
        devery = self.candidates(decode, req, pool, True)
        ctx = self._context(req, max(c.cached_tokens for c in (*pevery, *devery)))
        p: Candidate | None = None
        p_cost = math.inf
        pcands: list[Candidate] = []
        ppriced = _NONE_PRICED
        if prefill:
            pcands = pipe.filter(pevery, ctx)
            ppriced = pipe.price(pcands, ctx)
            i = pipe.pick(pcands, ppriced.costs, ctx)
            p, p_cost = pcands[i], ppriced.costs[i]
        local = pipe.filter(devery, ctx)
        lpriced = pipe.price(local, ctx)
        # each decode worker receiving the KV: its estimate as when it prefills locally
        remote = (pipe.price([Candidate(x.estimate, x.cached_tokens, False) for x in local],
                             ctx).costs if p is not None else ())
        routes: list[tuple[float, bool]] = []  # (cost, prefill locally)
        limit = self.config.local_prefill_tokens
        for k, x in enumerate(local):
            via_p = p_cost + remote[k] if p is not None else math.inf
            here = math.inf
            if p is None or ctx.uncached(x) <= limit:
                here = lpriced.costs[k]
            routes.append((here, True) if here <= via_p else (via_p, False))
        j = pipe.pick(local, [r[0] for r in routes], ctx)
        d, (cost, is_local) = local[j], routes[j]
        rows = _explain((pcands, ppriced), (local, lpriced))
        if is_local:
            self._note_affinity(d, [*local, *pcands])
            reason = "short_uncached_remainder" if prefill else "no_prefill_worker"
            return RouteDecision(decode=d.estimate.worker, reason=reason,
                                 predicted_cached_blocks=self._blocks(d, req), cost=cost,
                                 ttft_s=_TTFT.cost(d, ctx), candidates=rows)
        assert p is not None
        self._note_affinity(p, [*pcands, *local])
        return RouteDecision(decode=d.estimate.worker, prefill=p.estimate.worker, reason="kv",
                             predicted_cached_blocks=self._blocks(p, req), cost=cost,
                             ttft_s=_TTFT.cost(p, ctx), candidates=rows)


def _no_ledger(worker_id: str) -> None:
    return None


_UNUSED_POOL = PoolSpeed()  # every candidate measured its speed: the pool's is not read
_NONE_PRICED = Priced([], [])


def _explain(*groups: tuple[Sequence[Candidate], Priced]) -> CandidateRows:
    """A decision's explanation: its candidates (groups of candidates with their prices, as
    priced at the decision), formatted only when read."""
    return CandidateRows(partial(_explanation_rows, groups))


_TTFT = TTFTScorer()


def _explanation_rows(groups: Sequence[tuple[Sequence[Candidate], Priced]]
                      ) -> list[dict[str, Any]]:
    """One row per candidate: its figures, each scorer's weighted cost and their sum."""
    out = []
    for cands, priced in groups:
        for i, c in enumerate(cands):
            e = c.estimate
            p = priced.breakdown(i)
            out.append({"worker": c.worker_id, "cached_tokens": c.cached_tokens,
                        "queued_tokens": round(e.queued_tokens), "waiting": e.pending_reqs,
                        "decoding": e.decoding_reqs,
                        **{k: round(v, 4) for k, v in p.items()},
                        "cost": round(sum(p.values()), 4)})
    return out


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
