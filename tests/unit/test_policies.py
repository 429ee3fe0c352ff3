"""Routing policies: round robin, random, least loaded; aggregated vs disaggregated pools."""

from __future__ import annotations

import pytest

from router.policies import (
    LeastLoadedPolicy,
    NoWorkersError,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)
from router.registry import WorkerInfo, WorkerLoad, WorkerRole


def w(wid: str, role: WorkerRole, running: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="127.0.0.1:1", model="m",
                      load=WorkerLoad(num_running_reqs=running))


P = [w("p0", WorkerRole.PREFILL), w("p1", WorkerRole.PREFILL)]
D = [w("d0", WorkerRole.DECODE), w("d1", WorkerRole.DECODE)]
B = [w("b0", WorkerRole.BOTH)]


def test_round_robin_alternates_both_pools() -> None:
    rr = RoundRobinPolicy()
    picks = [rr.choose(P, D, [1, 2], {}) for _ in range(4)]
    assert [(x.prefill.worker_id, x.decode.worker_id) for x in picks] == [
        ("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]


def test_aggregated_workers_prefill_locally() -> None:
    for policy in (RoundRobinPolicy(), RandomPolicy(seed=1), LeastLoadedPolicy()):
        decision = policy.choose([], B, [1], {})
        assert decision.prefill is None and decision.decode.worker_id == "b0"


def test_least_loaded_counts_engine_and_gateway_in_flight() -> None:
    busy = [w("d0", WorkerRole.DECODE, running=5), w("d1", WorkerRole.DECODE, running=1)]
    assert LeastLoadedPolicy().choose(P, busy, [1], {}).decode.worker_id == "d1"
    assert LeastLoadedPolicy().choose(P, busy, [1], {"d1": 10}).decode.worker_id == "d0"


def test_missing_pools_raise() -> None:
    with pytest.raises(NoWorkersError, match="decode"):
        RoundRobinPolicy().choose(P, [], [1], {})
    with pytest.raises(NoWorkersError, match="prefill"):
        RoundRobinPolicy().choose([], D, [1], {})


def test_make_policy() -> None:
    assert make_policy("least_loaded").name == "least_loaded"
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("psychic")
