"""The routing audit: what the prefix index predicted a worker held of a prompt, against what
that worker's engine then reported as prefix-cache hits.

For each audited request the gateway records two figures about **the worker that computes the
prompt** (the prefill worker when the KV moves, else the decode or aggregated worker):

- `predicted`: the cached tokens the route was chosen with (the index's longest cached prefix
  on that worker, in whole blocks, capped as the engine caps a hit: see `predicted_tokens`);
- `reported`: the engine's own count of prompt tokens it took from its local prefix cache.

A request is a **misprediction** when the two differ by more than one block (`over`: the index
claimed blocks the engine did not have; `under`: the engine held more than the index knew).
Over the last `window` audited requests:

    precision = sum(min(predicted, reported)) / sum(predicted)
    recall    = sum(min(predicted, reported)) / sum(reported)

Precision is the share of the predicted cache that was really there (low: the index claims
blocks that were evicted, or it is stale, so requests go to workers for a cache they do not
get); recall is the share of the engines' hits the index foresaw (low: the index misses what
the engines hold, e.g. hashes that do not match, or lost events). Each is undefined (NaN) while
its denominator is 0.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

Verdict = Literal["hit", "over", "under"]
"""`hit`: within a block of the prediction; `over`/`under`: the prediction was too high/low."""

DEFAULT_WINDOW = 1000


def predicted_tokens(blocks: int, block_size: int, prompt_tokens: int) -> int:
    """The cached tokens an index prediction of `blocks` blocks means for a prompt of
    `prompt_tokens` tokens, as the engine can hit them: vLLM always computes a prompt's last
    token, so a hit is at most the whole blocks of the first `prompt_tokens - 1` tokens."""
    if blocks < 0 or block_size <= 0 or prompt_tokens < 0:
        raise ValueError(f"blocks {blocks}, block_size {block_size} and prompt_tokens "
                         f"{prompt_tokens} must be >= 0 (block_size > 0)")
    most = max(prompt_tokens - 1, 0) // block_size * block_size
    return min(blocks * block_size, most)


@dataclass(frozen=True)
class AuditRecord:
    """One audited request."""

    predicted: int
    reported: int
    block_size: int

    @property
    def matched(self) -> int:
        """The predicted cached tokens the engine confirmed."""
        return min(self.predicted, self.reported)

    @property
    def verdict(self) -> Verdict:
        if self.predicted - self.reported > self.block_size:
            return "over"
        if self.reported - self.predicted > self.block_size:
            return "under"
        return "hit"


class RouteAudit:
    """Counters and sliding-window gauges of predicted vs reported cached tokens."""

    def __init__(self, registry: CollectorRegistry, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 request (got {window})")
        r = registry
        self.audited = Counter("splitserve_gateway_route_audited_requests",
                               "Routed requests whose prediction was compared with the engine's "
                               "reported prefix-cache hit", registry=r)
        self.predicted = Counter("splitserve_gateway_route_predicted_cached_tokens",
                                 "Cached prompt tokens the index predicted on the worker that "
                                 "computed the prompt (audited requests)", registry=r)
        self.reported = Counter("splitserve_gateway_route_reported_cached_tokens",
                                "Prompt tokens that worker's engine reported as local prefix-"
                                "cache hits (audited requests)", registry=r)
        self.matched = Counter("splitserve_gateway_route_matched_cached_tokens",
                               "min(predicted, reported) per audited request: predicted cached "
                               "tokens the engine confirmed", registry=r)
        self.mispredictions = Counter(
            "splitserve_gateway_route_mispredictions",
            "Audited requests whose prediction was off by more than one KV block (over: the "
            "index claimed more than the engine had; under: less)", ["direction"], registry=r)
        self._precision = Gauge("splitserve_gateway_route_hit_precision",
                                "sum(min(predicted, reported)) / sum(predicted) over the last "
                                "`window` audited requests (NaN: nothing predicted)",
                                registry=r)
        self._recall = Gauge("splitserve_gateway_route_hit_recall",
                             "sum(min(predicted, reported)) / sum(reported) over the last "
                             "`window` audited requests (NaN: nothing reported)", registry=r)
        for direction in ("over", "under"):
            self.mispredictions.labels(direction)
        self._precision.set(math.nan)
        self._recall.set(math.nan)
        self.window = window
        self._last: deque[AuditRecord] = deque()
        self._sums = [0, 0, 0]  # predicted, reported, matched over the window

    def record(self, predicted: int, reported: int, block_size: int) -> AuditRecord:
        """Count one request: `predicted` and `reported` cached tokens of the worker that
        computed its prompt, whose KV blocks hold `block_size` tokens."""
        if predicted < 0 or reported < 0 or block_size <= 0:
            raise ValueError(f"predicted {predicted} and reported {reported} must be >= 0, "
                             f"block_size {block_size} > 0")
        rec = AuditRecord(predicted, reported, block_size)
        self.audited.inc()
        self.predicted.inc(predicted)
        self.reported.inc(reported)
        self.matched.inc(rec.matched)
        if rec.verdict != "hit":
            self.mispredictions.labels(rec.verdict).inc()
        self._add(rec, +1)
        self._last.append(rec)
        if len(self._last) > self.window:
            self._add(self._last.popleft(), -1)
        self._precision.set(self.precision if self.precision is not None else math.nan)
        self._recall.set(self.recall if self.recall is not None else math.nan)
        return rec

    def _add(self, rec: AuditRecord, sign: int) -> None:
        self._sums[0] += sign * rec.predicted
        self._sums[1] += sign * rec.reported
        self._sums[2] += sign * rec.matched

    @property
    def precision(self) -> float | None:
        """Over the window; None while nothing was predicted."""
        predicted, _, matched = self._sums
        return matched / predicted if predicted else None

    @property
    def recall(self) -> float | None:
        """Over the window; None while nothing was reported."""
        _, reported, matched = self._sums
        return matched / reported if reported else None
