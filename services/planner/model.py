"""The planner's capacity model and scaling rules: pure functions of what was observed.

Two layers (formulas in docs/planner.md):

1. **Estimate** (`prefill_estimate`, `decode_estimate`, `aggregated_estimate`): how many workers
   a pool needs now — the largest of a feed-forward term (offered load over one worker's
   capacity at the target utilisation) and feedback terms (SLO figure over its target, queue
   depth, KV usage).
2. **Decide** (`decide`): turn that estimate into the pool's next desired size, gently —
   scale up at once (at most once per `cooldown_up_s`), scale down by one worker at a time, only
   after the pool has wanted fewer workers for `cooldown_down_s`, not within `cooldown_down_s`
   of its last change, not while any SLO figure is above `scale_down_slo_ratio` of its target,
   not while the pool is still starting or draining workers, and not on incomplete metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.planner.config import CapacityConfig, PoolLimits


@dataclass(frozen=True)
class PoolSignals:
    """What was observed of one pool over the last window."""

    serving: int = 0
    starting: int = 0
    draining: int = 0
    ttft_p90_s: float | None = None  # None: no request finished its first token in the window
    itl_p90_s: float | None = None
    prompt_tokens_per_s: float | None = None
    running: int = 0  # requests the pool's engines run now
    waiting: int = 0  # requests queued in the pool's engines
    kv_usage: float = 0.0  # mean KV-cache usage of the pool's workers, 0..1
    complete: bool = True  # False when some worker's metrics could not be read


@dataclass(frozen=True)
class Estimate:
    """Workers a pool needs, with every term of the model (for logs and metrics)."""

    replicas: int
    terms: dict[str, int]

    @property
    def reason(self) -> str:
        """The term that set the estimate (ties: the first in model order)."""
        best = max(self.terms.values(), default=0)
        return next((k for k, v in self.terms.items() if v == best), "none")


def _slo_term(serving: int, observed_s: float | None, target_s: float, max_factor: float) -> int:
    """Serving workers scaled by observed/target when the SLO is breached, else 0."""
    if observed_s is None or observed_s <= target_s:
        return 0
    return math.ceil(max(serving, 1) * min(observed_s / target_s, max_factor))


def _kv_term(sig: PoolSignals, cap: CapacityConfig) -> int:
    """Serving workers scaled by KV usage over its target when above it, else 0."""
    if sig.kv_usage <= cap.kv_usage_target:
        return 0
    return math.ceil(max(sig.serving, 1) * min(sig.kv_usage / cap.kv_usage_target,
                                               cap.max_scale_up_factor) - 1e-9)


def prefill_estimate(sig: PoolSignals, ttft_target_s: float, cap: CapacityConfig) -> Estimate:
    """Prefill workers needed: compute load, TTFT breach, queue depth."""
    rate = sig.prompt_tokens_per_s or 0.0
    terms = {
        "load": math.ceil(rate / (cap.prefill_tokens_per_s * cap.target_utilisation) - 1e-9),
        "ttft": _slo_term(sig.serving, sig.ttft_p90_s, ttft_target_s, cap.max_scale_up_factor),
        "queue": math.ceil(sig.waiting / cap.max_queue_per_worker - 1e-9),
    }
    return Estimate(max(terms.values()), terms)


def decode_estimate(sig: PoolSignals, itl_target_s: float, cap: CapacityConfig) -> Estimate:
    """Decode workers needed: concurrent streams, ITL breach, KV usage, queue depth."""
    streams = sig.running + sig.waiting
    terms = {
        "load": math.ceil(streams / (cap.decode_concurrency * cap.target_utilisation) - 1e-9),
        "itl": _slo_term(sig.serving, sig.itl_p90_s, itl_target_s, cap.max_scale_up_factor),
        "kv": _kv_term(sig, cap),
        "queue": math.ceil(sig.waiting / cap.max_queue_per_worker - 1e-9),
    }
    return Estimate(max(terms.values()), terms)


def aggregated_estimate(sig: PoolSignals, ttft_target_s: float, itl_target_s: float,
                        cap: CapacityConfig) -> Estimate:
    """Workers of role `both` needed: each engine prefills and decodes, so its prefill and
    decode utilisations add up in the load term; every feedback term of both pools applies."""
    rate = sig.prompt_tokens_per_s or 0.0
    streams = sig.running + sig.waiting
    busy = rate / cap.prefill_tokens_per_s + streams / cap.decode_concurrency
    terms = {
        "load": math.ceil(busy / cap.target_utilisation - 1e-9),
        "ttft": _slo_term(sig.serving, sig.ttft_p90_s, ttft_target_s, cap.max_scale_up_factor),
        "itl": _slo_term(sig.serving, sig.itl_p90_s, itl_target_s, cap.max_scale_up_factor),
        "kv": _kv_term(sig, cap),
        "queue": math.ceil(sig.waiting / cap.max_queue_per_worker - 1e-9),
    }
    return Estimate(max(terms.values()), terms)


def slo_clear(ttft_p90_s: float | None, itl_p90_s: float | None, ttft_target_s: float,
              itl_target_s: float, ratio: float) -> bool:
    """True when every observed SLO figure is below `ratio` of its target (no figure: clear)."""
    return all(v is None or v < ratio * t
               for v, t in ((ttft_p90_s, ttft_target_s), (itl_p90_s, itl_target_s)))


def clamp(n: int, limits: PoolLimits) -> int:
    """`n` within the pool's [min_replicas, max_replicas]."""
    return max(limits.min_replicas, min(limits.max_replicas, n))


@dataclass
class PoolState:
    """What `decide` remembers of one pool between steps."""

    target: int
    last_up: float = -math.inf
    last_change: float = -math.inf
    below_since: float | None = None  # since when the estimate has been below the target


@dataclass(frozen=True)
class Decision:
    """One step's outcome for one pool."""

    target: int
    direction: str  # up | down | hold
    reason: str
    recommended: int = 0


@dataclass(frozen=True)
class Gentleness:
    """The timing rules of `decide`."""

    cooldown_up_s: float
    cooldown_down_s: float


def decide(state: PoolState, est: Estimate, sig: PoolSignals, limits: PoolLimits,
           rules: Gentleness, slo_is_clear: bool, now: float) -> Decision:
    """The pool's next target; updates `state` in place (pure apart from that)."""
    rec = clamp(est.replicas, limits)
    cur = state.target
    if cur != clamp(cur, limits):  # bounds changed under us: obey them at once
        return _change(state, clamp(cur, limits), rec, "bounds", now)
    if rec > cur:
        state.below_since = None
        if now - state.last_up < rules.cooldown_up_s:
            return Decision(cur, "hold", "cooldown_up", rec)
        return _change(state, rec, rec, est.reason, now)
    if rec == cur:
        state.below_since = None
        return Decision(cur, "hold", "steady", rec)
    if state.below_since is None:
        state.below_since = now
    if not sig.complete:
        return Decision(cur, "hold", "metrics_incomplete", rec)
    if not slo_is_clear:
        return Decision(cur, "hold", "slo_not_clear", rec)
    if sig.starting or sig.draining:
        return Decision(cur, "hold", "pool_changing", rec)
    if (now - state.below_since < rules.cooldown_down_s
            or now - state.last_change < rules.cooldown_down_s):
        return Decision(cur, "hold", "cooldown_down", rec)
    return _change(state, cur - 1, rec, est.reason, now)


def _change(state: PoolState, new: int, rec: int, reason: str, now: float) -> Decision:
    direction = "up" if new > state.target else "down"
    state.target = new
    state.last_change = now
    state.below_since = now if rec < new else None  # still wanting fewer: the window goes on
    if direction == "up":
        state.last_up = now
    return Decision(new, direction, reason, rec)
