"""The candidate's own time to first token (router/cost_model.py)."""

from __future__ import annotations

from collections.abc import Sequence

from router.cost_model import prefill_ttft, receive_tail
from router.plugins import Candidate, RouteContext


class TTFTScorer:
    """Seconds to the first token: the prefill queued ahead, the uncached part of the prompt,
    the decode steps it shares; for a worker that receives the KV, the pull and its first
    step (the prefill worker's part is priced on the prefill worker)."""

    name = "ttft"

    def cost(self, c: Candidate, ctx: RouteContext) -> float:
        if c.computes:
            return prefill_ttft(c.estimate, ctx.uncached(c), ctx.prompt_tokens,
                                ctx.load_weight, ctx.step_tokens)
        return receive_tail(c.estimate, ctx.prompt_tokens, ctx.load_weight)

    def costs(self, cands: Sequence[Candidate], ctx: RouteContext) -> list[float]:
        n, lw, st = ctx.prompt_tokens, ctx.load_weight, ctx.step_tokens
        return [prefill_ttft(c.estimate, max(n - c.cached_tokens, 0), n, lw, st) if c.computes
                else receive_tail(c.estimate, n, lw) for c in cands]
