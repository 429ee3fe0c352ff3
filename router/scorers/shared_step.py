"""The delay a new prefill adds to the requests already waiting on the same worker.

vLLM schedules the waiting requests' prefills together, in the same engine steps, and each of
them gets its first token only when its step is done: u more tokens of prefill on a worker
with n requests waiting for their first token delay about all n of them by u / R. A burst of
requests that all hold their prefix on one worker therefore costs more there than each one's
own time to first token says, and spreads to an idle worker once the sum of those delays
exceeds what the cache saves. (A request already inside a step being computed is not
delayed; counting every waiting request is the upper bound.)
"""

from __future__ import annotations

from collections.abc import Sequence

from router.plugins import Candidate, RouteContext


class SharedStepScorer:
    """n(w) * u / R(w): the seconds of first-token delay the candidate's prefill adds to the
    n(w) requests waiting on it. Zero for a worker that receives the KV (it computes nothing),
    and for one that has not measured its speed (its waiting requests are not counted)."""

    name = "shared_step"

    def cost(self, c: Candidate, ctx: RouteContext) -> float:
        if not c.computes or not c.estimate.measured:
            return 0.0
        return c.estimate.pending_reqs * ctx.uncached(c) / c.estimate.prefill_tokens_per_s

    def costs(self, cands: Sequence[Candidate], ctx: RouteContext) -> list[float]:
        n = ctx.prompt_tokens  # max(n - cached, 0): ctx.uncached(c) of a computing c
        return [e.pending_reqs * max(n - c.cached_tokens, 0) / e.prefill_tokens_per_s
                if c.computes and (e := c.estimate).measured else 0.0 for c in cands]
