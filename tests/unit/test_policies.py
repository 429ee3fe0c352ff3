"""Routing policies: round robin, random, least loaded, and the KV-aware cost function."""

from __future__ import annotations

from collections import Counter

import pytest

from router.policies import (
    KVPolicy,
    KVPolicyConfig,
    LeastLoadedPolicy,
    NoWorkersError,
    RandomPolicy,
    RoundRobinPolicy,
    RouteRequest,
    decision_is_forced,
    make_policy,
)
from router.registry import WorkerInfo, WorkerLoad, WorkerRole

BS = 32


def w(wid: str, role: WorkerRole, running: int = 0, kv: float = 0.0) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="127.0.0.1:1", model="m", block_size=BS,
                      load=WorkerLoad(num_running_reqs=running, kv_cache_usage=kv))


P = [w("p0", WorkerRole.PREFILL), w("p1", WorkerRole.PREFILL)]
D = [w("d0", WorkerRole.DECODE), w("d1", WorkerRole.DECODE)]
B = [w("b0", WorkerRole.BOTH)]
REQ = RouteRequest(num_tokens=10 * BS)


def test_round_robin_alternates_both_pools() -> None:
    rr = RoundRobinPolicy()
    picks = [rr.choose(P, D, REQ) for _ in range(4)]
    assert [(x.prefill.worker_id, x.decode.worker_id) for x in picks] == [
        ("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]
    assert all(x.outcome == "remote_prefill" for x in picks)


def test_aggregated_workers_prefill_locally() -> None:
    for policy in (RoundRobinPolicy(), RandomPolicy(seed=1), LeastLoadedPolicy(), KVPolicy()):
        decision = policy.choose([], B, REQ)
        assert decision.prefill is None and decision.decode.worker_id == "b0"
        assert decision.outcome == "local_prefill"


def test_least_loaded_counts_engine_and_gateway_in_flight() -> None:
    busy = [w("d0", WorkerRole.DECODE, running=5), w("d1", WorkerRole.DECODE, running=1)]
    assert LeastLoadedPolicy().choose(P, busy, REQ).decode.worker_id == "d1"
    req = RouteRequest(num_tokens=REQ.num_tokens, in_flight={"d1": 10})
    assert LeastLoadedPolicy().choose(P, busy, req).decode.worker_id == "d0"


def test_own_in_flight_is_not_counted_twice() -> None:
    # The worker's heartbeat already includes this gateway's 3 requests: it has 3, not 6.
    from router.policies import queue_depth

    owner = WorkerInfo(worker_id="b0", role=WorkerRole.BOTH, address="-", model="m",
                       load=WorkerLoad(in_flight=3, num_running_reqs=3))
    assert queue_depth(owner, {"b0": 3}) == 3
    assert queue_depth(owner, {"b0": 5}) == 5  # sent two more since the heartbeat


def test_no_decode_worker_raises_no_prefill_worker_means_local_prefill() -> None:
    for policy in (RoundRobinPolicy(), RandomPolicy(), LeastLoadedPolicy(), KVPolicy()):
        with pytest.raises(NoWorkersError, match="decode"):
            policy.choose(P, [], REQ)
        d = policy.choose([], D, REQ)
        assert d.prefill is None and d.decode in D and d.reason == "no_prefill_worker"


def test_make_policy() -> None:
    assert make_policy("least_loaded").name == "least_loaded"
    assert make_policy("kv").uses_prefix_index
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("psychic")


# --- KV-aware ----------------------------------------------------------------------------------

def test_kv_prefers_the_prefill_worker_holding_the_prefix() -> None:
    req = RouteRequest(num_tokens=10 * BS, cached_blocks={"p1": 8, "p0": 2})
    decision = KVPolicy().choose(P, D, req)
    assert decision.prefill.worker_id == "p1" and decision.predicted_cached_blocks == 8
    assert decision.outcome == "remote_prefill"


def test_kv_hot_worker_with_cache_loses_past_the_configured_imbalance() -> None:
    # load_weight 0.25: the worker holding the whole prompt keeps winning while it has at most
    # 1 / 0.25 = 4 more requests queued than an idle worker holding none of it.
    policy = KVPolicy(KVPolicyConfig(load_weight=0.25, kv_usage_weight=0.0))
    cached = {"b-hot": 10}
    for queued, expected in [(0, "b-hot"), (3, "b-hot"), (5, "b-idle"), (40, "b-idle")]:
        pool = [w("b-hot", WorkerRole.BOTH, running=queued), w("b-idle", WorkerRole.BOTH)]
        req = RouteRequest(num_tokens=10 * BS, cached_blocks=cached)
        assert policy.choose([], pool, req).decode.worker_id == expected, queued
    # the gateway's own in-flight requests count as load too
    pool = [w("b-hot", WorkerRole.BOTH), w("b-idle", WorkerRole.BOTH)]
    req = RouteRequest(num_tokens=10 * BS, cached_blocks=cached, in_flight={"b-hot": 6})
    assert policy.choose([], pool, req).decode.worker_id == "b-idle"


def test_kv_a_full_cache_counts_against_a_worker() -> None:
    pool = [w("b0", WorkerRole.BOTH, kv=0.95), w("b1", WorkerRole.BOTH, kv=0.0)]
    req = RouteRequest(num_tokens=10 * BS, cached_blocks={"b0": 3})  # 30% cached on b0
    assert KVPolicy().choose([], pool, req).decode.worker_id == "b1"


def test_kv_conditional_disaggregation() -> None:
    policy = KVPolicy(KVPolicyConfig(local_prefill_tokens=64))
    # decode d0 holds all but 40 tokens of the prompt: it prefills the rest itself
    req = RouteRequest(num_tokens=10 * BS + 40, cached_blocks={"d0": 10})
    decision = policy.choose(P, D, req)
    assert decision.decode.worker_id == "d0" and decision.prefill is None
    assert decision.reason == "short_uncached_remainder" and decision.outcome == "local_prefill"
    # a short prompt never moves KV
    assert policy.choose(P, D, RouteRequest(num_tokens=50)).prefill is None
    # a long uncached prompt goes to a prefill worker
    assert policy.choose(P, D, RouteRequest(num_tokens=10 * BS)).prefill is not None
    # threshold 0 disables local prefill of anything but a fully cached prompt
    strict = KVPolicy(KVPolicyConfig(local_prefill_tokens=0))
    assert strict.choose(P, D, RouteRequest(num_tokens=10 * BS + 1, cached_blocks={"d0": 10})
                         ).prefill is not None


def test_kv_without_prefill_workers_decode_prefills_itself() -> None:
    decision = KVPolicy().choose([], D, REQ)
    assert decision.prefill is None and decision.reason == "no_prefill_worker"


def test_kv_ties_are_spread_and_temperature_samples() -> None:
    policy = KVPolicy()
    picks = [policy.choose(P, D, REQ) for _ in range(10)]
    assert Counter(x.prefill.worker_id for x in picks) == {"p0": 5, "p1": 5}
    assert Counter(x.decode.worker_id for x in picks) == {"d0": 5, "d1": 5}
    hot = RouteRequest(num_tokens=10 * BS, cached_blocks={"p0": 10})
    greedy = Counter(KVPolicy().choose(P, D, hot).prefill.worker_id for _ in range(50))
    assert greedy == {"p0": 50}
    warm = KVPolicy(KVPolicyConfig(temperature=0.5, seed=3))
    sampled = Counter(warm.choose(P, D, hot).prefill.worker_id for _ in range(400))
    # cost gap 1.0 at temperature 0.5: p1 gets about e^-2 / (1 + e^-2) = 12% of the requests
    assert 0.05 < sampled["p1"] / 400 < 0.22 and sampled["p0"] > sampled["p1"]


def test_a_forced_route_needs_no_index() -> None:
    both, other = w("b0", WorkerRole.BOTH), w("b1", WorkerRole.BOTH)
    d0, d1, p0 = w("d0", WorkerRole.DECODE), w("d1", WorkerRole.DECODE), w("p0", WorkerRole.PREFILL)
    assert decision_is_forced([], [both])  # one aggregated worker
    assert decision_is_forced([], [d0])  # one decode worker, nobody to hand the prompt to
    assert not decision_is_forced([], [both, other])  # which one holds the prompt?
    assert not decision_is_forced([p0], [d0])  # prefill here or there?
    assert not decision_is_forced([], [d0, d1])
    # and indeed: with one candidate the kv policy's choice ignores what is cached
    kv = KVPolicy()
    for cached in ({}, {"b0": 8}):
        req = RouteRequest(num_tokens=300, cached_blocks=cached, in_flight={})
        assert kv.choose([], [both], req).decode is both
        assert kv.choose([], [d0], req).prefill is None
