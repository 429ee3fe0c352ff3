"""Cold long prefills go where they delay the fewest cached requests.

A long prefill of a prompt no worker holds must run somewhere, and it holds up every request
that arrives there while it runs (the engine schedules first come, first served). Requests
routed to a worker *for its cache* cannot move elsewhere without losing it, so a worker that
keeps receiving them is a bad place for such a prefill even when its queue is short right
now. With λ(w) such requests per second arriving at w and a prefill of p = c / R(w) seconds,
about λ·p of them arrive during it, each waiting p/2 on average: the scorer's cost is
λ(w)·p²/2 seconds of other requests' time.

Only the *cold* part c of the prompt counts: the tokens no worker holds. Computing on w what
another worker holds (the prompt's system prompt, a document) is not work that must happen
somewhere: it is a choice the `ttft` and `shared_step` scorers price, and it makes w a second
holder of that prefix. Charging it here would keep every prefix on the workers that first
computed it: a hot prefix on one worker while another idles, whose affinity traffic (counted
when it had some) would forbid it to take a copy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Callable

from router.plugins import Candidate, RouteContext


class AffinityRate:
    """Requests per second routed to each worker for its cache, exponentially decayed."""

    def __init__(self, half_life_s: float = 5.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._k = math.log(2) / half_life_s
        self._clock = clock
        self._v: dict[str, tuple[float, float]] = {}  # worker -> (decayed count, at)

    def record(self, worker_id: str) -> None:
        """One request went to `worker_id` because it held more of its prompt than any
        other candidate."""
        now = self._clock()
        v, at = self._v.get(worker_id, (0.0, now))
        self._v[worker_id] = (v * math.exp(-self._k * (now - at)) + 1.0, now)

    def rate(self, worker_id: str) -> float:
        """Decayed count x decay rate: requests per second at a steady rate."""
        got = self._v.get(worker_id)
        if got is None:  # none recorded: no clock read
            return 0.0
        v, at = got
        return v * math.exp(-self._k * (self._clock() - at)) * self._k


class ColdSpreadScorer:
    """λ(w)·p²/2: the wait a prefill of p seconds of tokens no worker holds adds to the cached
    requests expected to arrive at w during it. Zero for workers that have not measured their
    speed (p unknown)."""

    name = "cold_spread"

    def cost(self, c: Candidate, ctx: RouteContext) -> float:
        if not c.computes or not c.estimate.measured:
            return 0.0
        return _priced(c, ctx, ctx.affinity_rate(c.worker_id))

    def costs(self, cands: Sequence[Candidate], ctx: RouteContext) -> list[float]:
        rate = ctx.affinity_rate
        return [_priced(c, ctx, r) if c.computes and c.estimate.measured
                and (r := rate(c.estimate.worker.worker_id)) else 0.0 for c in cands]


def _priced(c: Candidate, ctx: RouteContext, rate: float) -> float:
    if not rate:  # no affinity traffic (most workers): 0 whatever p
        return 0.0
    p = ctx.cold(c) / c.estimate.prefill_tokens_per_s
    return rate * p * p / 2
