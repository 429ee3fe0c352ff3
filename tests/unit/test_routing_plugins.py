"""The routing plugin interface: a new scorer is a small class, composed by weight."""

from __future__ import annotations

from router.cost_model import PoolSpeed, estimate
from router.filters import KVHeadroomFilter
from router.plugins import Candidate, GreedyPicker, Pipeline, RouteContext
from router.registry import WorkerInfo, WorkerLoad, WorkerRole
from router.scorers import SCORERS, KVPressureScorer, TTFTScorer


def cand(wid: str, cached: int = 0, kv: float = 0.0) -> Candidate:
    info = WorkerInfo(worker_id=wid, role=WorkerRole.BOTH, address="-", model="m",
                      load=WorkerLoad(prefill_tokens_per_s=1000.0, kv_cache_usage=kv))
    return Candidate(estimate(info, None, {}, PoolSpeed()), cached, computes=True)


class PreferName:
    """A scorer written for this test: 1 s for every worker but the named one."""

    name = "prefer_name"

    def __init__(self, wid: str) -> None:
        self.wid = wid

    def cost(self, c: Candidate, ctx: RouteContext) -> float:
        return 0.0 if c.worker_id == self.wid else 1.0


def test_weighted_scorers_and_picker() -> None:
    ctx = RouteContext(prompt_tokens=1000)
    cands = [cand("a", cached=800), cand("b")]
    # ttft alone: a computes 200 tokens (0.2 s), b 1,000 (1.0 s)
    pipe = Pipeline([(TTFTScorer(), 1.0)])
    costs = [pipe.cost(c, ctx) for c in cands]
    assert costs[0] < costs[1] and cands[pipe.pick(cands, costs, ctx)].worker_id == "a"
    # a new scorer at weight 1 (1 s against a) tips it; at weight 0.5 it does not
    for weight, winner in [(1.0, "b"), (0.5, "a")]:
        pipe = Pipeline([(TTFTScorer(), 1.0), (PreferName("b"), weight)])
        costs = [pipe.cost(c, ctx) for c in cands]
        assert cands[pipe.pick(cands, costs, ctx)].worker_id == winner, weight
        assert pipe.breakdown(cands[0], ctx)["prefer_name"] == weight


def test_kv_pressure_in_prefill_time_units() -> None:
    ctx = RouteContext(prompt_tokens=1000)
    assert KVPressureScorer(0.5).cost(cand("a", kv=1.0), ctx) == 0.5  # half of a 1 s prefill
    assert set(SCORERS) >= {"ttft", "kv_pressure", "cold_spread"}


def test_filters_drop_but_never_empty_the_pool() -> None:
    ctx = RouteContext(prompt_tokens=100)
    pipe = Pipeline([(TTFTScorer(), 1.0)], [KVHeadroomFilter(0.9)])
    full, roomy = cand("full", kv=0.97), cand("roomy", kv=0.2)
    assert [c.worker_id for c in pipe.filter([full, roomy], ctx)] == ["roomy"]
    assert [c.worker_id for c in pipe.filter([full], ctx)] == ["full"]


def test_greedy_ties_prefer_cache_then_rotate() -> None:
    ctx = RouteContext(prompt_tokens=100)
    picker = GreedyPicker()
    a, b = cand("a"), cand("b")
    assert [[a, b][picker.pick([a, b], [1.0, 1.0], ctx)].worker_id for _ in range(4)] == [
        "a", "b", "a", "b"]
    held = cand("held", cached=64)
    assert picker.pick([a, held], [1.0, 1.0], ctx) == 1


def test_greedy_remembers_tie_rotations_only_for_a_bounded_number_of_sets() -> None:
    from router.plugins import _MAX_TIE_SETS

    ctx = RouteContext(prompt_tokens=100)
    picker = GreedyPicker()
    for i in range(_MAX_TIE_SETS + 50):  # a gateway's shortlists: a new set per decision
        cands = [cand(f"w{i}"), cand(f"x{i}")]
        picker.pick(cands, [1.0, 2.0], ctx)  # no tie: nothing remembered
        picker.pick(cands, [1.0, 1.0], ctx)  # a tie: its rotation
        assert len(picker._ties) <= _MAX_TIE_SETS
    tied = [cand("p"), cand("q")]
    assert [tied[picker.pick(tied, [1.0, 1.0], ctx)].worker_id for _ in range(4)] == [
        "p", "q", "p", "q"]
