"""Windowed quantiles from Prometheus histogram pages (the direct metrics source's maths)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram as PromHistogram, generate_latest

from services.planner.histogram import Histogram, parse_page

BUCKETS = (0.1, 0.5, 1.0, 2.0)


def _page(observations: list[float], labels: tuple[str, ...] = ("0", "1")) -> str:
    reg = CollectorRegistry()
    h = PromHistogram("vllm:time_to_first_token_seconds", "ttft", ["engine"], buckets=BUCKETS,
                      registry=reg)
    c = Counter("vllm:prompt_tokens_by_source", "tokens", ["engine", "source"], registry=reg)
    for i, v in enumerate(observations):
        h.labels(labels[i % len(labels)]).observe(v)
    c.labels("0", "local_compute").inc(100)
    c.labels("1", "local_compute").inc(50)
    c.labels("0", "local_cache_hit").inc(7)
    return generate_latest(reg).decode()


def test_parse_sums_label_sets() -> None:
    page = parse_page(_page([0.05, 0.3, 0.3, 1.5]), ("vllm:time_to_first_token_seconds",),
                      ('vllm:prompt_tokens_by_source{source="local_compute"}',))
    h = page.histograms["vllm:time_to_first_token_seconds"]
    assert h.buckets == ((0.1, 1.0), (0.5, 3.0), (1.0, 3.0), (2.0, 4.0), (float("inf"), 4.0))
    assert page.counters == {'vllm:prompt_tokens_by_source{source="local_compute"}': 150.0}


def test_quantile_interpolates_like_prometheus() -> None:
    h = Histogram(((0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)))
    # rank 0.9 * 40 = 36 falls in (0.5, 1.0] holding 30..40 -> 0.5 + 0.5 * 6/10 = 0.8
    assert h.quantile(0.9) == pytest.approx(0.8)
    # rank 5 in the first bucket, which starts at 0 -> 0.05
    assert h.quantile(0.125) == pytest.approx(0.05)
    # rank in +Inf -> highest finite bound
    assert Histogram(((1.0, 1.0), (float("inf"), 10.0))).quantile(0.9) == 1.0
    assert Histogram().quantile(0.9) is None
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_window_delta_ignores_older_observations() -> None:
    old = Histogram(((0.1, 100.0), (1.0, 100.0), (float("inf"), 100.0)))  # fast history
    new = Histogram(((0.1, 100.0), (1.0, 110.0), (float("inf"), 110.0)))  # then 10 slow ones
    assert new.quantile(0.9) == pytest.approx(0.099)  # cumulative hides the slowdown
    assert new.minus(old).quantile(0.9) == pytest.approx(0.1 + 0.9 * 0.9)  # the window shows it


def test_counter_reset_counts_everything_since() -> None:
    old = Histogram(((1.0, 50.0), (float("inf"), 50.0)))
    restarted = Histogram(((1.0, 3.0), (float("inf"), 4.0)))
    assert restarted.minus(old) == restarted


def test_plus_unions_bounds() -> None:
    a = Histogram(((1.0, 1.0), (float("inf"), 2.0)))
    b = Histogram(((0.5, 1.0), (float("inf"), 1.0)))
    assert a.plus(b).buckets == ((0.5, 1.0), (1.0, 1.0), (float("inf"), 3.0))
