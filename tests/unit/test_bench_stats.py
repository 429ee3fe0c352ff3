"""Latency percentiles and throughput of a run."""

from __future__ import annotations

import numpy as np
import pytest

from bench.client import RequestResult, RunResult
from bench.stats import Percentiles, percentile, summarize


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [5, 1, 4, 2, 3],
                                    list(np.random.default_rng(0).exponential(size=101)),
                                    list(np.random.default_rng(1).normal(size=37))])
@pytest.mark.parametrize("p", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(values: list[float], p: float) -> None:
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert percentile([10, 20], 90) == pytest.approx(19.0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    p = Percentiles.of_seconds([0.001, 0.002, 0.003])
    assert p.p50 == pytest.approx(2.0) and p.p50 <= p.p90 <= p.p99 <= 3.0
    assert Percentiles.of_seconds([]).model_dump() == {"p50": None, "p90": None, "p99": None}


def test_summarize_counts_only_successes_in_latency_and_throughput() -> None:
    ok = [RequestResult(i, ok=True, status=200, ttft_s=0.1 * (i + 1), itl_s=[0.01, 0.03],
                        e2e_s=1.0 + i, output_tokens=10) for i in range(4)]
    bad = RequestResult(4, ok=False, status=500, error="HTTP 500: boom", ttft_s=9.0, e2e_s=9.0,
                        output_tokens=99)
    stats = summarize(RunResult([*ok, bad], wall_s=2.0, unsent=3, model="m"))
    assert stats.requests == 5 and stats.errors == 1 and stats.unsent == 3
    assert stats.output_tokens == 40
    assert stats.output_tok_s == pytest.approx(20.0) and stats.req_s == pytest.approx(2.0)
    assert stats.ttft_ms.p50 == pytest.approx(250.0)
    assert stats.e2e_ms.p99 == pytest.approx(percentile([1000, 2000, 3000, 4000], 99))
    assert stats.itl_ms.p50 == pytest.approx(20.0)
    assert stats.error_samples == ["#4: HTTP 500: boom"]
    empty = summarize(RunResult([], wall_s=0.0, unsent=0, model="m"))
    assert empty.req_s == 0 and empty.ttft_ms.p50 is None
