"""The kv policy's TTFT cost model, with figures: which worker wins, and where the cache
stops paying."""

from __future__ import annotations

import pytest

from router.cost_model import PoolSpeed, estimate, prefill_ttft, receive_tail
from router.dispatch_ledger import OwnLoad
from router.policies import KVPolicy, KVPolicyConfig, RouteRequest
from router.registry import WorkerInfo, WorkerLoad, WorkerRole

BS = 32
R = 2000.0  # prefill tokens/s
STEP, PER_SEQ = 0.005, 0.001  # decode-only step: 5 ms + 1 ms per decoding request


def w(wid: str, role: WorkerRole = WorkerRole.BOTH, *, rate: float = R, pending: int = 0,
      decoding: int = 0, remote_wait: float = 0.0, kv: float = 0.0) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="-", model="m", block_size=BS,
                      load=WorkerLoad(prefill_tokens_per_s=rate, step_s=STEP,
                                      step_per_seq_s=PER_SEQ, pending_prompt_tokens=pending,
                                      pending_prefill_reqs=1 if pending else 0,
                                      decoding_reqs=decoding, remote_kv_wait_s=remote_wait,
                                      kv_cache_usage=kv, updated_at=100.0))


# the scorers of the TTFT alone (no KV pressure, no cold spread) unless a test says otherwise
TTFT_ONLY = KVPolicyConfig(scorer_weights={"ttft": 1.0})
N = 1000          # prompt tokens
HOT = 28          # blocks the hot worker holds: 896 tokens, 104 left to compute


def test_ttft_formula_by_hand() -> None:
    e = estimate(w("a", pending=500, decoding=3), None, {}, PoolSpeed())
    # (500 queued + 104 own) / 2000 tok/s + one step of 5 ms + 1 ms x (3 + 1)
    assert prefill_ttft(e, 104, N, 0.25, 2048) == pytest.approx(604 / R + 0.009)
    # 3,000 tokens of work span two 2,048-token steps, each with the batch's decode
    assert prefill_ttft(e, 2500, N, 0.25, 2048) == pytest.approx(3000 / R + 2 * 0.009)


def test_cached_worker_wins_until_its_queue_outweighs_the_saved_prefill() -> None:
    """The cache saves 896 tokens of prefill; the hot worker keeps winning while the prefill
    queued ahead on it is less than that, and loses past it: the crossover is the saving."""
    policy = KVPolicy(TTFT_ONLY)
    req = RouteRequest(num_tokens=N, cached_blocks={"hot": HOT})
    for queued, winner in [(0, "hot"), (500, "hot"), (880, "hot"), (912, "cold"),
                           (5000, "cold")]:
        pool = [w("hot", pending=queued), w("cold")]
        assert policy.choose([], pool, req).decode.worker_id == winner, queued


def test_queued_tokens_not_request_counts() -> None:
    """Ten queued requests of 20 uncached tokens each (200 tokens) weigh less than the
    896-token saving; one queued cold prompt of 1,000 tokens weighs more."""
    policy = KVPolicy(TTFT_ONLY)
    req = RouteRequest(num_tokens=N, cached_blocks={"hot": HOT})
    many_small = [w("hot"), w("cold")]
    many_small[0].load.pending_prefill_reqs, many_small[0].load.pending_prompt_tokens = 10, 200
    assert policy.choose([], many_small, req).decode.worker_id == "hot"
    one_big = [w("hot", pending=1000), w("cold")]
    assert policy.choose([], one_big, req).decode.worker_id == "cold"


def test_running_batch_costs_step_time() -> None:
    """Both prompts uncached; the queued worker's 1,000 tokens (0.5 s) against a worker with
    a decode batch whose steps are 1 ms per request slower: the batch loses past 50."""
    policy = KVPolicy(TTFT_ONLY)
    req = RouteRequest(num_tokens=N)
    # queued: (1000 + 1000) / 2000 + 0.006 = 1.006 s; batch b: 0.5 + 0.005 + 0.001 (b + 1)
    for batch, winner in [(40, "batch"), (400, "batch"), (600, "queued")]:
        pool = [w("queued", pending=1000), w("batch", decoding=batch)]
        assert policy.choose([], pool, req).decode.worker_id == winner, batch


def test_fresh_dispatches_count_between_heartbeats_and_only_once() -> None:
    policy = KVPolicy(TTFT_ONLY)
    pool = [w("hot"), w("cold")]
    # published: both idle; this gateway has since sent 2,000 uncached tokens to "hot"
    sent = {"hot": OwnLoad(pending_reqs=2, pending_uncached_tokens=2000), "cold": OwnLoad()}
    req = RouteRequest(num_tokens=N, cached_blocks={"hot": HOT}, own=sent)
    assert policy.choose([], pool, req).decode.worker_id == "cold"
    # "hot" published 1,000 pending prompt tokens, all of them this gateway's request that
    # was pending at the snapshot and is now known to compute only 104: counted once, as 104
    pool = [w("hot", pending=1000), w("cold")]
    own = {"hot": OwnLoad(pending_reqs=1, pending_uncached_tokens=104,
                          snapshot_pending_reqs=1, snapshot_pending_prompt_tokens=1000),
           "cold": OwnLoad()}
    e = estimate(pool[0], own["hot"], {}, PoolSpeed.of(pool))
    assert e.queued_tokens == 104
    req = RouteRequest(num_tokens=N, cached_blocks={"hot": HOT}, own=own)
    assert policy.choose([], pool, req).decode.worker_id == "hot"
    # without the ledger, the published 1,000 tokens stand (past the 896 crossover)
    req = RouteRequest(num_tokens=N, cached_blocks={"hot": HOT})
    assert policy.choose([], pool, req).decode.worker_id == "cold"


def test_unmeasured_worker_priced_at_the_pools_speed_by_request_count() -> None:
    fresh = w("fresh", rate=0.0)
    fresh.load.num_running_reqs = 2
    pool = [fresh, w("measured")]
    e = estimate(fresh, None, {}, PoolSpeed.of(pool))
    assert not e.measured and e.prefill_tokens_per_s == R and e.unknown_reqs == 2
    # 2 requests x 0.25 x 1,000 tokens = 500 tokens ahead, at 2,000 tok/s
    assert prefill_ttft(e, 0, N, 0.25, 2048) == pytest.approx(0.25 + STEP + PER_SEQ)


def test_conditional_disaggregation_by_the_same_estimate() -> None:
    p = [w("p0", WorkerRole.PREFILL, rate=20000.0)]
    policy = KVPolicy(TTFT_ONLY)
    req = RouteRequest(num_tokens=N, cached_blocks={"d0": 30})  # d0 lacks 40 tokens
    # a decode worker as fast as the prefill worker computes 40 tokens itself
    d = [w("d0", WorkerRole.DECODE, rate=20000.0, remote_wait=0.02)]
    assert policy.choose(p, d, req).prefill is None
    # a slow decode worker (1,000 tok/s): 40 / 1000 + 6 ms = 46 ms locally against
    # 1000 / 20000 + 6 ms + max(20 ms KV pull, 6 ms) = 76 ms remotely: still local
    d = [w("d0", WorkerRole.DECODE, rate=1000.0, remote_wait=0.02)]
    assert policy.choose(p, d, req).prefill is None
    # a slower one (500 tok/s): 40 / 500 + 6 ms = 86 ms locally: the prefill worker wins
    d = [w("d0", WorkerRole.DECODE, rate=500.0, remote_wait=0.02)]
    decision = policy.choose(p, d, req)
    assert decision.prefill is not None and decision.reason == "kv"
    local = prefill_ttft(estimate(d[0], None, {}, PoolSpeed()), 40, N, 0.25, 2048)
    remote = (prefill_ttft(estimate(p[0], None, {}, PoolSpeed()), N, N, 0.25, 2048)
              + receive_tail(estimate(d[0], None, {}, PoolSpeed()), N, 0.25))
    assert remote < local and decision.cost == pytest.approx(remote)


def test_decode_worker_chosen_by_the_whole_route() -> None:
    p = [w("p0", WorkerRole.PREFILL)]
    d = [w("busy", WorkerRole.DECODE, decoding=50, remote_wait=0.02),
         w("idle", WorkerRole.DECODE, remote_wait=0.02)]
    decision = KVPolicy(TTFT_ONLY).choose(p, d, RouteRequest(num_tokens=N))
    assert decision.decode.worker_id == "idle" and decision.prefill.worker_id == "p0"


def test_cold_long_prefill_avoids_the_worker_cached_requests_keep_coming_to() -> None:
    policy = KVPolicy(KVPolicyConfig(scorer_weights={"ttft": 1.0, "cold_spread": 1.0}))
    for _ in range(20):
        policy.affinity.record("sticky")
    pool = [w("sticky"), w("other", pending=200)]
    # a cold 1,500-token prompt: 0.1 s slower on "other", but on "sticky" its 0.75 s prefill
    # would hold up the cached requests arriving there meanwhile
    cold = RouteRequest(num_tokens=1500)
    assert policy.choose([], pool, cold).decode.worker_id == "other"
    # a prompt "sticky" holds still goes there (its 104-token remainder delays nobody)
    hot = RouteRequest(num_tokens=N, cached_blocks={"sticky": HOT})
    assert policy.choose([], pool, hot).decode.worker_id == "sticky"
    # without cached traffic the cold prompt takes the quicker worker
    fresh = KVPolicy(KVPolicyConfig(scorer_weights={"ttft": 1.0, "cold_spread": 1.0}))
    assert fresh.choose([], pool, cold).decode.worker_id == "sticky"


def test_scorer_weights_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        KVPolicyConfig(scorer_weights={"telepathy": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        KVPolicyConfig(scorer_weights={"ttft": -1.0})


def test_a_burst_onto_the_cached_worker_spreads_once_it_delays_the_waiting_ones() -> None:
    """n requests of the burst already wait on "hot", 104 uncached tokens each. Their own TTFT
    alone keeps the next one on "hot" while (104 n + 104) / 2000 + 6 ms < 0.506 s, n <= 8;
    but they share its next prefill step, and the newcomer's 104 tokens delay each of them by
    52 ms: with shared_step, "hot" wins while 0.104 n + 0.058 < 0.506, n <= 4."""
    req_for = lambda n: RouteRequest(  # noqa: E731
        num_tokens=N, cached_blocks={"hot": HOT},
        own={"hot": OwnLoad(pending_reqs=n, pending_uncached_tokens=104 * n),
             "cold": OwnLoad()})
    pool = [w("hot"), w("cold")]
    alone = KVPolicy(TTFT_ONLY)
    shared = KVPolicy(KVPolicyConfig(scorer_weights={"ttft": 1.0, "shared_step": 1.0}))
    for n, with_shared, without in [(4, "hot", "hot"), (5, "cold", "hot"), (8, "cold", "hot"),
                                    (9, "cold", "cold")]:
        assert shared.choose([], pool, req_for(n)).decode.worker_id == with_shared, n
        assert alone.choose([], pool, req_for(n)).decode.worker_id == without, n


def test_a_copy_of_a_prefix_another_worker_holds_is_not_a_cold_prefill() -> None:
    """A hot system prompt on "holder" (608 of the prompt's 720 tokens), with four requests
    waiting there (440 uncached tokens); "idle" holds none of it, but requests came to it for
    its own cache lately (20 of them: 2.8/s at the 5 s half-life). The 608 tokens "idle"
    would compute are held elsewhere: not work that must happen somewhere, so cold_spread
    charges only the 112 nobody holds, and "idle" takes a copy:

        holder: (440 + 112) / 2000 + 6 ms + shared_step 4 x 56 ms        = 0.506 s
        idle:   720 / 2000 + 6 ms + cold_spread 2.77 x 0.056^2 / 2       = 0.370 s

    Charging all 720 tokens as cold (2.77 x 0.36^2 / 2 = 0.18 s) would make it 0.546 s and
    keep the prompt on "holder" for as long as "idle" has affinity traffic of its own."""
    policy = KVPolicy(KVPolicyConfig(scorer_weights={"ttft": 1.0, "shared_step": 1.0,
                                                     "cold_spread": 1.0}))
    for _ in range(20):
        policy.affinity.record("idle")
    pool = [w("holder"), w("idle")]
    req = RouteRequest(num_tokens=720, cached_blocks={"holder": 19},
                       own={"holder": OwnLoad(pending_reqs=4, pending_uncached_tokens=440),
                            "idle": OwnLoad()})
    d = policy.choose([], pool, req)
    assert d.decode.worker_id == "idle"
    costs = {c["worker"]: c for c in d.candidates}
    assert costs["holder"]["cost"] == pytest.approx(0.506, abs=1e-3)
    assert costs["idle"]["cold_spread"] == pytest.approx(
        policy.affinity.rate("idle") * (112 / R) ** 2 / 2, abs=1e-4)
    assert costs["idle"]["cost"] == pytest.approx(0.370, abs=1e-3)
