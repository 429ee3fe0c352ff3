"""The route stage's shortlist on a real Redis registry and prefix index, with no engine: in a
pool larger than the shortlist the kv policy scores only the prompt's holders (the index's and
the dispatch ledger's) and the least loaded, and still routes to the holder, or a cold prompt to
the least-loaded worker; a pool no larger than the shortlist is scored whole, as before."""

from __future__ import annotations

from redis.asyncio import Redis

from router.block_hash import BlockHasher
from router.policies import KVPolicy, KVPolicyConfig, RouteRequest
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerRole
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET

NS = "shortlist"
BS = 16
PROMPT = list(range(1, 6 * BS + 1))  # 6 blocks
COLD = list(range(5000, 5000 + 6 * BS))


class WatchedKV(KVPolicy):
    """The kv policy, remembering which workers it was given to score."""

    def __init__(self, config: KVPolicyConfig | None = None) -> None:
        super().__init__(config)
        self.seen: list[tuple[set[str], set[str]]] = []

    def choose(self, prefill, decode, req):
        self.seen.append(({w.worker_id for w in prefill}, {w.worker_id for w in decode}))
        return super().choose(prefill, decode, req)


def worker(worker_id: str, running: int, role: WorkerRole = WorkerRole.BOTH) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address="127.0.0.1:1", model="m",
                      block_size=BS, hash_algo="sha256", hash_seed="0",
                      load=WorkerLoad(num_running_reqs=running))


async def stage_of(r: Redis, workers: list[WorkerInfo]) -> tuple[RouteStage, WatchedKV]:
    registry = WorkerRegistry(r, NS, ttl_s=30)
    for w in workers:
        await registry.register(w)
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, refresh_s=60)
    await directory.refresh()
    policy = WatchedKV()
    return RouteStage(directory, policy, PrefixIndex(r, NS), GatewayMetrics()), policy


async def hold(r: Redis, worker_id: str, tokens: list[int]) -> None:
    await PrefixIndex(r, NS).add_blocks(worker_id, BlockHasher(BS, "sha256", "0")
                                        .block_hashes(tokens))


async def test_a_large_pool_scores_the_holder_and_the_least_loaded(r: Redis) -> None:
    # 50 workers with 2-6 requests running each, but w37 idle; w12 (2 running, as the 3
    # least-loaded busy workers) holds PROMPT
    pool = [worker(f"w{i:02d}", {37: 0, 12: 2}.get(i, 2 + i % 5)) for i in range(50)]
    stage, policy = await stage_of(r, pool)
    assert stage.shortlist is not None and stage.shortlist.size == 16
    await hold(r, "w12", PROMPT)

    hot = await stage.route(PROMPT + [7])
    # scored: the one holder + the 4 least loaded (w37, then the 2-running ones by id)
    assert policy.seen[-1] == (set(), {"w12", "w37", "w00", "w05", "w10"})
    assert hot.decode.worker_id == "w12" and hot.predicted_cached_blocks == 6

    cold = await stage.route(COLD)
    assert policy.seen[-1] == (set(), {"w37", "w00", "w05", "w10"})
    assert cold.decode.worker_id == "w37" and cold.predicted_cached_blocks == 0

    # retried without w37: it is not scored, and one more least-loaded worker is
    retry = await stage.route(COLD, exclude=frozenset({"w37"}))
    assert policy.seen[-1] == (set(), {"w00", "w05", "w10", "w12"})
    assert retry.decode.worker_id in {"w00", "w05", "w10", "w12"}


async def test_each_pool_of_a_disaggregated_cluster_is_shortlisted(r: Redis) -> None:
    prefill = [worker(f"p{i:02d}", 1 + i % 3, WorkerRole.PREFILL) for i in range(20)]
    decode = [worker(f"d{i:02d}", 1 + i % 3, WorkerRole.DECODE) for i in range(20)]
    stage, policy = await stage_of(r, prefill + decode)
    await hold(r, "p07", PROMPT)
    route = await stage.route(PROMPT + [7])
    seen_p, seen_d = policy.seen[-1]
    assert seen_p == {"p07", "p00", "p03", "p06", "p09"}
    assert seen_d == {"d00", "d03", "d06", "d09"}
    assert route.prefill is not None and route.prefill.worker_id == "p07"
    assert route.decode.worker_id in seen_d


async def test_a_pool_no_larger_than_the_shortlist_is_scored_whole(r: Redis) -> None:
    # 17 workers: 16 (the shortlist's size) once one is excluded
    pool = [worker(f"w{i:02d}", i % 4) for i in range(17)]
    stage, policy = await stage_of(r, pool)
    await hold(r, "w09", PROMPT)
    everyone = {w.worker_id for w in pool}
    got = [await stage.route(PROMPT + [7], exclude=frozenset({"w16"})),
           await stage.route(COLD, exclude=frozenset({"w16"}))]
    assert [seen for _, seen in policy.seen] == [everyone - {"w16"}] * 2
    assert got[0].decode.worker_id == "w09"
    # the same decisions as the policy given every worker directly (the route stage before)
    twin = KVPolicy()
    for tokens, route in zip((PROMPT + [7], COLD), got):
        cached = {"w09": 6} if tokens is not COLD else {}
        req = RouteRequest(num_tokens=len(tokens), cached_blocks=cached,
                           own=stage.ledger.view({w.worker_id: 0.0 for w in pool}))
        assert twin.choose([], [w for w in stage.directory.workers if w.worker_id != "w16"],
                           req).decode.worker_id == route.decode.worker_id


async def test_a_prefix_in_flight_makes_its_worker_a_holder(r: Redis) -> None:
    pool = [worker(f"w{i:02d}", 0) for i in range(50)]
    stage, policy = await stage_of(r, pool)
    first = await stage.route(PROMPT + [900])
    holder = first.computes.worker_id
    # dispatched (as the remote engine core does): in the ledger, and in flight there, so
    # it is no longer among the least loaded; the index does not know the prompt yet
    stage.sent(first, "r1", len(PROMPT) + 1)
    stage.directory.in_flight[holder] += 1
    second = await stage.route(PROMPT + [901, 902])
    idle = [w.worker_id for w in pool if w.worker_id != holder]
    assert policy.seen[-1][1] == {holder, *idle[:4]}  # a holder only by the ledger
    assert second.decode.worker_id == holder and second.predicted_cached_blocks == 6
