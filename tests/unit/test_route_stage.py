"""The gateway's route stage on a real Redis registry and prefix index, with no engine: it asks
the index only when a policy that uses it has a choice to make, and routes to the worker
holding the prompt; a prefix this gateway has just sent to a worker is routed to before the
index knows it (the dispatch ledger's pending prefixes), and the prediction says so."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from router.block_hash import BlockHasher
from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerRole
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET

NS = "stage"
BS = 16
PROMPT = list(range(1, 81))  # 5 blocks of 16


def worker(worker_id: str, load: WorkerLoad | None = None) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.BOTH, address="127.0.0.1:1",
                      model="m", block_size=BS, hash_algo="sha256", hash_seed="0",
                      **({"load": load} if load is not None else {}))


def computing(pending_tokens: int) -> WorkerLoad:
    """A worker's published load: one request of `pending_tokens` waiting, measured speed."""
    return WorkerLoad(prefill_tokens_per_s=1000.0, step_s=0.02, pending_prefill_reqs=1,
                      pending_prompt_tokens=pending_tokens, updated_at=time.time())


def lookups(stage: RouteStage) -> float:
    samples = {s.name: s.value for m in stage.metrics.index_lookup.collect()
               for s in m.samples}
    return samples["splitserve_gateway_index_lookup_seconds_count"]


async def route_three(r: Redis) -> tuple[RouteStage, list[str]]:
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET)
    await directory.refresh()
    stage = RouteStage(directory, make_policy("kv"), PrefixIndex(r, NS), GatewayMetrics())
    chosen = [(await stage.route(PROMPT)).decode.worker_id for _ in range(3)]
    return stage, chosen


async def test_the_kv_policy_asks_the_index_only_when_there_is_a_choice(r: Redis) -> None:
    registry = WorkerRegistry(r, NS, ttl_s=30)
    await registry.register(worker("b-a"))
    stage, chosen = await route_three(r)  # one worker: every request goes there, unasked
    assert lookups(stage) == 0.0 and chosen == ["b-a"] * 3

    await registry.register(worker("b-b"))
    await PrefixIndex(r, NS).add_blocks("b-b", BlockHasher(BS, "sha256", "0")
                                        .block_hashes(PROMPT))
    stage, chosen = await route_three(r)  # a choice: one lookup each, the holder wins
    assert lookups(stage) == 3.0 and chosen == ["b-b"] * 3


async def test_a_prefix_just_sent_is_routed_to_before_the_index_knows_it(r: Redis) -> None:
    registry = WorkerRegistry(r, NS, ttl_s=30)
    # both workers have another gateway's 300-token prompt to compute first
    for wid in ("w-a", "w-b"):
        await registry.register(worker(wid, computing(300)))
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, refresh_s=60)
    await directory.refresh()
    stage = RouteStage(directory, make_policy("kv"), PrefixIndex(r, NS), GatewayMetrics())
    system = list(range(1, 6 * BS + 1))  # six blocks every request shares
    first = await stage.route(system + [900, 901])
    holder = first.computes.worker_id
    assert first.predicted_cached_tokens == 0
    assert first.prompt_blocks == tuple(BlockHasher(BS, "sha256", "0").block_hashes(
        system + [900, 901]))
    # sent (what the remote engine core does with every route): its engine will hold the
    # six blocks, but publishes them only after the step that computes them
    stage.sent(first, "r1", len(system) + 2)
    second = await stage.route(system + [902, 903, 904])
    # the holder: 300 + 98 tokens ahead, then 3 of its own: 0.401 s + a step, and 3 tokens
    # more in the step of the 2 requests waiting there (shared_step 0.006 s); the other: 300
    # ahead, then all 99: 0.399 s + a step, but 99 tokens more in the step of the one waiting
    # there (0.099 s)
    assert second.computes.worker_id == holder
    assert (second.predicted_cached_blocks, second.predicted_cached_tokens) == (6, 6 * BS)
    # the first request ended: the ledger forgets its prompt (by then the index knows it, or
    # the engine did not keep it)
    stage.ledger.finished("r1")
    third = await stage.route(system + [905])
    assert third.predicted_cached_tokens == 0
