"""The capacity model and the scaling rules, with figures (docs/planner.md)."""

from __future__ import annotations

import math

import pytest

from services.planner.config import CapacityConfig, PoolLimits
from services.planner.model import (Estimate, Gentleness, PoolSignals, PoolState,
                                    aggregated_estimate, decide, decode_estimate,
                                    prefill_estimate, slo_clear)

CAP = CapacityConfig(prefill_tokens_per_s=4000, decode_concurrency=16, target_utilisation=0.8,
                     max_queue_per_worker=4, kv_usage_target=0.8, max_scale_up_factor=2.0)
LIMITS = PoolLimits(min_replicas=1, max_replicas=8)
RULES = Gentleness(cooldown_up_s=30, cooldown_down_s=300)


def test_prefill_load_term_is_token_rate_over_capacity_at_target_utilisation() -> None:
    # 10 000 tok/s over 4000 tok/s/worker at 80 % = 3.125 -> 4 workers
    est = prefill_estimate(PoolSignals(serving=2, prompt_tokens_per_s=10_000), 0.5, CAP)
    assert est.terms["load"] == 4 and est.replicas == 4 and est.reason == "load"
    # exactly 3 workers' worth (9600 tok/s) needs 3, not 4
    assert prefill_estimate(PoolSignals(serving=3, prompt_tokens_per_s=9600), 0.5,
                            CAP).terms["load"] == 3


def test_prefill_ttft_breach_scales_serving_by_ratio_capped() -> None:
    # p90 0.75 s against 0.5 s: 3 serving x 1.5 = 4.5 -> 5
    est = prefill_estimate(PoolSignals(serving=3, ttft_p90_s=0.75, prompt_tokens_per_s=100),
                           0.5, CAP)
    assert est.terms["ttft"] == 5 and est.replicas == 5 and est.reason == "ttft"
    # p90 5 s against 0.5 s: ratio 10 capped at 2 -> 6
    assert prefill_estimate(PoolSignals(serving=3, ttft_p90_s=5.0), 0.5, CAP).terms["ttft"] == 6
    # met SLO or no data: no SLO term
    assert prefill_estimate(PoolSignals(serving=3, ttft_p90_s=0.4), 0.5, CAP).terms["ttft"] == 0
    assert prefill_estimate(PoolSignals(serving=3), 0.5, CAP).terms["ttft"] == 0


def test_prefill_queue_term() -> None:
    # 9 waiting requests, 4 tolerated per worker -> 3 workers
    est = prefill_estimate(PoolSignals(serving=1, waiting=9), 0.5, CAP)
    assert est.terms == {"load": 0, "ttft": 0, "queue": 3} and est.reason == "queue"


def test_decode_terms() -> None:
    # 40 running + 4 waiting streams over 16 x 0.8 = 12.8 per worker -> 3.4375 -> 4
    sig = PoolSignals(serving=2, running=40, waiting=4, itl_p90_s=0.05, kv_usage=0.5)
    est = decode_estimate(sig, 0.1, CAP)
    assert est.terms == {"load": 4, "itl": 0, "kv": 0, "queue": 1} and est.replicas == 4
    # ITL 0.13 s against 0.1 s: 2 x 1.3 = 2.6 -> 3
    assert decode_estimate(PoolSignals(serving=2, itl_p90_s=0.13), 0.1, CAP).terms["itl"] == 3
    # KV 96 % against 80 %: 2 x 1.2 = 2.4 -> 3
    assert decode_estimate(PoolSignals(serving=2, kv_usage=0.96), 0.1, CAP).terms["kv"] == 3
    assert decode_estimate(PoolSignals(serving=2, kv_usage=0.8), 0.1, CAP).terms["kv"] == 0


def test_aggregated_load_adds_prefill_and_decode_utilisation() -> None:
    # one engine prefills and decodes: 4000 tok/s (one worker's prefill capacity) + 24 streams
    # (1.5 workers' decode) = 2.5 busy workers / 0.8 = 3.125 -> 4, where either pool's model
    # alone would ask for 2
    sig = PoolSignals(serving=2, prompt_tokens_per_s=4000, running=20, waiting=4)
    est = aggregated_estimate(sig, 0.5, 0.1, CAP)
    assert est.terms == {"load": 4, "ttft": 0, "itl": 0, "kv": 0, "queue": 1}
    assert prefill_estimate(sig, 0.5, CAP).terms["load"] == 2
    assert decode_estimate(sig, 0.1, CAP).terms["load"] == 2
    # an idle pool needs none (decide clamps to min_replicas)
    assert aggregated_estimate(PoolSignals(serving=2), 0.5, 0.1, CAP).replicas == 0


def test_aggregated_feedback_terms_are_both_pools() -> None:
    # TTFT 0.75 s against 0.5 s: 2 x 1.5 = 3; ITL 0.13 s against 0.1 s: 2 x 1.3 = 2.6 -> 3;
    # KV 96 % against 80 %: 2 x 1.2 = 2.4 -> 3
    est = aggregated_estimate(PoolSignals(serving=2, ttft_p90_s=0.75), 0.5, 0.1, CAP)
    assert (est.terms["ttft"], est.reason) == (3, "ttft")
    est = aggregated_estimate(PoolSignals(serving=2, itl_p90_s=0.13), 0.5, 0.1, CAP)
    assert (est.terms["itl"], est.reason) == (3, "itl")
    assert aggregated_estimate(PoolSignals(serving=2, kv_usage=0.96), 0.5, 0.1,
                               CAP).terms["kv"] == 3
    # a breach of 10x is capped at max_scale_up_factor 2
    assert aggregated_estimate(PoolSignals(serving=2, ttft_p90_s=5.0, itl_p90_s=1.0), 0.5, 0.1,
                               CAP).replicas == 4


def test_slo_clear_uses_the_hysteresis_ratio() -> None:
    assert slo_clear(None, None, 0.5, 0.1, 0.7)
    assert slo_clear(0.34, 0.06, 0.5, 0.1, 0.7)
    assert not slo_clear(0.36, 0.06, 0.5, 0.1, 0.7)  # under target, but not clearly
    assert not slo_clear(0.1, 0.08, 0.5, 0.1, 0.7)


def _est(n: int) -> Estimate:
    return Estimate(n, {"load": n})


def test_scale_up_at_once_then_cooldown_up() -> None:
    st = PoolState(target=2)
    d = decide(st, _est(5), PoolSignals(serving=2), LIMITS, RULES, slo_is_clear=False, now=100)
    assert (d.target, d.direction, d.reason) == (5, "up", "load") and st.target == 5
    d = decide(st, _est(7), PoolSignals(serving=5), LIMITS, RULES, False, now=110)
    assert (d.target, d.direction, d.reason) == (5, "hold", "cooldown_up")
    d = decide(st, _est(7), PoolSignals(serving=5), LIMITS, RULES, False, now=131)
    assert (d.target, d.direction) == (7, "up")


def test_scale_up_is_clamped_to_max() -> None:
    st = PoolState(target=6)
    d = decide(st, _est(50), PoolSignals(serving=6), LIMITS, RULES, False, now=0)
    assert d.target == 8 and d.recommended == 8


def test_scale_down_one_at_a_time_after_cooldown() -> None:
    st = PoolState(target=4)
    idle = PoolSignals(serving=4)
    d = decide(st, _est(1), idle, LIMITS, RULES, True, now=1000)
    assert (d.target, d.reason) == (4, "cooldown_down")  # wanted fewer only since now
    assert decide(st, _est(1), idle, LIMITS, RULES, True, now=1299).reason == "cooldown_down"
    d = decide(st, _est(1), idle, LIMITS, RULES, True, now=1300)
    assert (d.target, d.direction) == (3, "down")  # one worker, not straight to 1
    # the next one only cooldown_down_s after this change
    assert decide(st, _est(1), PoolSignals(serving=3), LIMITS, RULES, True,
                  now=1599).reason == "cooldown_down"
    assert decide(st, _est(1), PoolSignals(serving=3), LIMITS, RULES, True, now=1600).target == 2


def test_a_recommendation_at_or_above_target_restarts_the_down_window() -> None:
    st = PoolState(target=3)
    decide(st, _est(1), PoolSignals(serving=3), LIMITS, RULES, True, now=0)
    decide(st, _est(3), PoolSignals(serving=3), LIMITS, RULES, True, now=200)  # busy again
    assert decide(st, _est(1), PoolSignals(serving=3), LIMITS, RULES, True,
                  now=400).reason == "cooldown_down"
    assert decide(st, _est(1), PoolSignals(serving=3), LIMITS, RULES, True, now=700).target == 2


@pytest.mark.parametrize("sig,clear,reason", [
    (PoolSignals(serving=4), False, "slo_not_clear"),
    (PoolSignals(serving=3, starting=1), True, "pool_changing"),
    (PoolSignals(serving=4, draining=1), True, "pool_changing"),
    (PoolSignals(serving=4, complete=False), True, "metrics_incomplete"),
])
def test_no_scale_down_while_unsafe(sig: PoolSignals, clear: bool, reason: str) -> None:
    st = PoolState(target=4, last_change=-math.inf, below_since=0)
    d = decide(st, _est(1), sig, LIMITS, RULES, clear, now=10_000)
    assert (d.target, d.direction, d.reason) == (4, "hold", reason)


def test_bounds_are_obeyed_at_once() -> None:
    st = PoolState(target=12)
    d = decide(st, _est(12), PoolSignals(serving=12), LIMITS, RULES, False, now=0)
    assert (d.target, d.direction, d.reason) == (8, "down", "bounds")
    st = PoolState(target=0)
    assert decide(st, _est(0), PoolSignals(), LIMITS, RULES, True, now=0).target == 1
