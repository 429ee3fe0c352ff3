"""A decision's explanation (router/route_explanation.py): formatted when first read, the same
rows as formatting them at the decision."""

from __future__ import annotations

from router.policies import KVPolicy, KVPolicyConfig, RouteRequest
from router.registry import WorkerInfo, WorkerLoad, WorkerRole
from router.route_explanation import CandidateRows


def _worker(wid: str, role: WorkerRole, pending: int) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="-", model="m", block_size=16,
                      load=WorkerLoad(prefill_tokens_per_s=2000.0, step_s=0.005,
                                      step_per_seq_s=0.001, pending_prompt_tokens=pending,
                                      pending_prefill_reqs=1 if pending else 0,
                                      kv_cache_usage=0.3, updated_at=100.0))


def test_rows_are_made_once_on_first_read() -> None:
    calls: list[int] = []

    def make() -> list[dict[str, int]]:
        calls.append(1)
        return [{"worker": 1}, {"worker": 2}]

    rows = CandidateRows(make)
    assert calls == []
    assert len(rows) == 2 and rows[1] == {"worker": 2} and list(rows) == [{"worker": 1},
                                                                         {"worker": 2}]
    assert rows == ({"worker": 1}, {"worker": 2}) and rows != ({"worker": 1},)
    assert calls == [1]


def test_a_decisions_rows_are_its_figures_when_read_later() -> None:
    """Disaggregated, decode workers too far from the prompt to prefill it locally (so not
    priced while deciding: priced for the explanation, as of the decision). Read after the
    affinity rates and the clock moved, the rows are those of the decision's moment: the
    same as a twin policy's, read at once."""
    now = [100.0]
    policies = []
    for _ in range(2):
        p = KVPolicy(KVPolicyConfig(local_prefill_tokens=0))
        p.affinity._clock = lambda: now[0]
        p.affinity.record("d2")
        policies.append(p)
    prefill = [_worker("p1", WorkerRole.PREFILL, 0), _worker("p2", WorkerRole.PREFILL, 900)]
    decode = [_worker("d1", WorkerRole.DECODE, 0), _worker("d2", WorkerRole.DECODE, 300)]
    req = RouteRequest(num_tokens=640, cached_blocks={"p2": 30, "d2": 10})
    later = policies[0].choose(prefill, decode, req)
    at_once = list(policies[1].choose(prefill, decode, req).candidates)
    assert at_once[3]["cold_spread"] > 0  # d2's affinity counts in its (unpriced) row
    for _ in range(3):
        policies[0].affinity.record("d2")
    now[0] += 2.0
    got = list(later.candidates)
    assert got == at_once
    assert [r["worker"] for r in got] == ["p1", "p2", "d1", "d2"]
    assert (got[1]["cached_tokens"], got[3]["cached_tokens"]) == (480, 160)
    assert later.candidates == tuple(at_once)
