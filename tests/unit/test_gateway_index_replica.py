"""The gateway's prefix index as services/gateway/gateway.py opens it (open_prefix_index):
with `index_replica` on, prefixes come from the local replica with no Redis lookup."""

from __future__ import annotations

import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from router.replica_config import IndexReplicaConfig
from router.replicated_index import ReplicatedPrefixIndex, open_prefix_index
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET

NS = "gw-replica"
PROMPT = list(range(1, 97))  # 6 blocks of 16


def _worker(wid: str) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=WorkerRole.BOTH, address=f"127.0.0.1:{1 + len(wid)}",
                      model="m", block_size=16, hash_algo="sha256", hash_seed="0")


async def _register(r: aioredis.Redis) -> None:
    registry = WorkerRegistry(r, NS, ttl_s=120)
    for wid in ("w-a", "w-b", "w-c"):
        await registry.register(_worker(wid))


async def test_routes_by_the_replica(r: aioredis.Redis) -> None:
    await _register(r)
    await PrefixIndex(r, NS).add_blocks("w-b", BlockHasher(16, "sha256", "0").block_hashes(PROMPT))
    index = await open_prefix_index(r, NS, IndexReplicaConfig())
    assert isinstance(index, ReplicatedPrefixIndex)
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, refresh_s=60)
    stage = RouteStage(directory, make_policy("kv"), index, GatewayMetrics())
    try:
        await directory.refresh()
        decision = await stage.route(PROMPT)
        assert (decision.decode.worker_id, decision.predicted_cached_blocks) == ("w-b", 6)
        assert decision.predicted_cached_tokens == 80
        assert (index.reads.replica, index.reads.redis) == (1, 0)
    finally:
        await directory.stop()
        await index.aclose()
