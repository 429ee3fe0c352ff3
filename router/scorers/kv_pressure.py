"""KV cache pressure: a worker whose cache is nearly full evicts (and may preempt) soon."""

from __future__ import annotations

from collections.abc import Sequence

from router.plugins import Candidate, RouteContext


class KVPressureScorer:
    """`kv_usage_weight` x KV usage (0..1) of the prompt's whole prefill time on the worker:
    at weight 0.5, a full cache costs as much as computing half the prompt."""

    name = "kv_pressure"

    def __init__(self, kv_usage_weight: float = 0.5) -> None:
        self.kv_usage_weight = kv_usage_weight

    def cost(self, c: Candidate, ctx: RouteContext) -> float:
        usage = min(max(c.estimate.worker.load.kv_cache_usage, 0.0), 1.0)
        return self.kv_usage_weight * usage * ctx.prompt_tokens / c.estimate.prefill_tokens_per_s

    def costs(self, cands: Sequence[Candidate], ctx: RouteContext) -> list[float]:
        k, n = self.kv_usage_weight, ctx.prompt_tokens
        return [k * min(max(e.worker.load.kv_cache_usage, 0.0), 1.0) * n / e.prefill_tokens_per_s
                for e in [c.estimate for c in cands]]
