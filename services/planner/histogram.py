"""Prometheus text → cumulative histograms and counters; windowed quantiles from bucket deltas.

`quantile` follows Prometheus's `histogram_quantile`: find the bucket holding rank q·count and
interpolate linearly inside it (the lowest bucket starts at 0; a rank in the +Inf bucket gives
the highest finite bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts, summed over label sets: ((upper bound, count), ...) by bound."""

    buckets: tuple[tuple[float, float], ...] = ()

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def minus(self, older: "Histogram") -> "Histogram":
        """Observations since `older` (a counter reset — fewer now — gives all of these)."""
        if not older.buckets:
            return self
        prev = dict(older.buckets)
        if any(c < prev.get(le, 0.0) for le, c in self.buckets) or self.count < older.count:
            return self
        return Histogram(tuple((le, c - prev.get(le, 0.0)) for le, c in self.buckets))

    def plus(self, other: "Histogram") -> "Histogram":
        """Both sets of observations (bucket bounds are unioned)."""
        if not self.buckets:
            return other
        if not other.buckets:
            return self
        a, b = dict(self.buckets), dict(other.buckets)
        return Histogram(tuple((le, a.get(le, 0.0) + b.get(le, 0.0))
                               for le in sorted(set(a) | set(b))))

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the observations, or None when there are none."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        prev_le, prev_count = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank and c > prev_count:
                if math.isinf(le):
                    return prev_le
                lower = prev_le if prev_le < le else 0.0
                return lower + (le - lower) * (rank - prev_count) / (c - prev_count)
            prev_le, prev_count = le, c
        return prev_le


@dataclass(frozen=True)
class Page:
    """The parts of one metrics page the planner reads."""

    histograms: dict[str, Histogram]
    counters: dict[str, float]


def parse_page(text: str, histograms: tuple[str, ...], counters: tuple[str, ...]) -> Page:
    """Histograms and counters named (family names, e.g. `vllm:prompt_tokens`), each summed over
    its label sets; a counter listed as `name{label=value}` sums only matching samples."""
    wanted = {}
    for spec in counters:
        name, _, sel = spec.partition("{")
        label, _, value = sel.rstrip("}").partition("=")
        wanted.setdefault(name, []).append((spec, label, value.strip('"')))
    acc: dict[str, dict[float, float]] = {h: {} for h in histograms}
    totals: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if fam.name in acc and s.name == fam.name + "_bucket" and "le" in s.labels:
                le = float(s.labels["le"])
                acc[fam.name][le] = acc[fam.name].get(le, 0.0) + float(s.value)
            elif s.name.removesuffix("_total") in wanted and s.name.endswith("_total"):
                for spec, label, value in wanted[s.name.removesuffix("_total")]:
                    if not label or s.labels.get(label) == value:
                        totals[spec] = totals.get(spec, 0.0) + float(s.value)
    return Page({h: Histogram(tuple(sorted(b.items()))) for h, b in acc.items()}, totals)
