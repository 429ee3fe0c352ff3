"""The gateway's route stage on a real Redis registry and prefix index: it asks the index only
when a policy that uses it has a choice to make, and routes to the worker holding the prompt."""

from __future__ import annotations

from redis.asyncio import Redis

from router.block_hash import BlockHasher
from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET

NS = "stage"
PROMPT = list(range(1, 81))  # 5 blocks of 16


def worker(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.BOTH, address="127.0.0.1:1",
                      model="m", block_size=16, hash_algo="sha256", hash_seed="0")


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
    await PrefixIndex(r, NS).add_blocks("b-b", BlockHasher(16, "sha256", "0")
                                        .block_hashes(PROMPT))
    stage, chosen = await route_three(r)  # a choice: one lookup each, the holder wins
    assert lookups(stage) == 3.0 and chosen == ["b-b"] * 3
