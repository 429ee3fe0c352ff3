"""The gateway's prefix index as services/gateway/gateway.py opens it (open_prefix_index):
with `index_replica` on, prefixes come from the local replica with no Redis lookup; with
SPLITSERVE_REDIS_INDEX_URL the index is on a Redis of its own and the gateway still routes by
prefix (the registry and the workers' liveness keys stay on the cluster's Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from router.replica_config import IndexReplicaConfig, RegistryFeedConfig
from router.replicated_index import ReplicatedPrefixIndex, open_prefix_index
from services import cluster_secret
from services.gateway.config import GatewayConfig
from services.gateway.gateway import Gateway
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET
from tests.support.redis import RedisServer, redis_server

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


@pytest.fixture(scope="module")
def index_srv() -> RedisServer:
    """The index's own Redis (the registry's is the module's `redis_srv`)."""
    with redis_server() as srv:
        yield srv


@pytest.mark.parametrize("replica", [False, True])
async def test_a_gateway_routes_by_prefix_with_the_index_on_its_own_redis(
        r: aioredis.Redis, redis_srv: RedisServer, index_srv: RedisServer, replica: bool,
        monkeypatch) -> None:
    monkeypatch.setenv(cluster_secret.ENV, TEST_SECRET.text)
    monkeypatch.setenv("SPLITSERVE_REDIS_INDEX_URL", index_srv.url)
    index_client = aioredis.Redis.from_url(index_srv.url)
    await index_client.flushdb()
    await _register(r)
    await PrefixIndex(index_client, NS).add_blocks(  # as w-b's updater writes them
        "w-b", BlockHasher(16, "sha256", "0").block_hashes(PROMPT))
    gateway = Gateway(GatewayConfig(model="m", redis_url=redis_srv.url, namespace=NS,
                                    worker_refresh_s=60,
                                    index_replica=IndexReplicaConfig() if replica else None))
    try:
        await gateway.start()
        stage = gateway.route_stage
        assert stage is not None and stage.index is not None
        assert stage.index.registry is gateway.redis and stage.index.redis is not gateway.redis
        decision = await stage.route(PROMPT)
        assert (decision.decode.worker_id, decision.predicted_cached_blocks) == ("w-b", 6)
        if replica:
            assert (stage.index.reads.replica, stage.index.reads.redis) == (1, 0)
        # w-b dies: its liveness key (on the registry's Redis) goes. A lookup from Redis reads
        # it there, before the directory (re-read every 60 s here) knows; the replica counts
        # the directory's live workers
        await r.delete(f"{NS}:worker:w-b:alive")
        if replica:
            await gateway.directory.refresh()
        decision = await stage.route(PROMPT)
        assert not decision.predicted_cached_blocks  # w-b's 6 blocks no longer count
        if replica:
            assert decision.decode.worker_id != "w-b"
        assert await r.keys(f"*{NS}:kv*") == []  # nothing of the index on the registry's Redis
    finally:
        await gateway.stop()
        await index_client.aclose()


def _samples(gateway: Gateway) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(gateway.metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_the_replica_and_the_feed_in_the_gateway_metrics(
        r: aioredis.Redis, redis_srv: RedisServer, monkeypatch) -> None:
    monkeypatch.setenv(cluster_secret.ENV, TEST_SECRET.text)
    monkeypatch.delenv("SPLITSERVE_REDIS_INDEX_URL", raising=False)
    await r.flushdb()
    await _register(r)
    hashes = BlockHasher(16, "sha256", "0").block_hashes(PROMPT)
    plain = Gateway(GatewayConfig(model="m", redis_url=redis_srv.url, namespace=NS,
                                  index_replica=None, registry_feed=None))
    gateway = Gateway(GatewayConfig(model="m", redis_url=redis_srv.url, namespace=NS))
    # on by default
    assert gateway.cfg.index_replica == IndexReplicaConfig()
    assert gateway.cfg.registry_feed == RegistryFeedConfig()
    try:
        await plain.start()
        assert not any(name.startswith(("splitserve_gateway_index_replica",
                                        "splitserve_gateway_registry_feed"))
                       for name, _ in _samples(plain)), "families of parts it does not run"
        await gateway.start()
        # the blocks are written after the replica warmed: they reach it by its change log
        await PrefixIndex(r, NS).add_blocks("w-b", hashes)
        stage = gateway.route_stage
        assert stage is not None
        for _ in range(200):
            if stage.index.replica.holders(hashes[-1]) == {"w-b"}:
                break
            await asyncio.sleep(0.01)
        decision = await stage.route(PROMPT)
        assert (decision.decode.worker_id, decision.predicted_cached_blocks) == ("w-b", 6)
        got = _samples(gateway)
        assert got[("splitserve_gateway_index_replica_synced", ())] == 1.0
        assert got[("splitserve_gateway_registry_feed_synced", ())] == 1.0
        assert got[("splitserve_gateway_index_replica_changes_total", ())] >= len(hashes)
        assert got[("splitserve_gateway_index_lookups_total", (("source", "replica"),))] == 1
        assert got[("splitserve_gateway_index_lookups_total", (("source", "redis"),))] == 0
        p50 = got[("splitserve_gateway_index_replica_lag_seconds", (("quantile", "0.5"),))]
        p99 = got[("splitserve_gateway_index_replica_lag_seconds", (("quantile", "0.99"),))]
        assert 0 <= p50 <= p99 < 5, (p50, p99)
        assert got[("splitserve_gateway_registry_feed_warms_total", ())] >= 1
        # the feed stops being read: it is no longer synced once max_staleness_s has passed
        await gateway.directory.feed.stop()
        await asyncio.sleep(gateway.cfg.registry_feed.max_staleness_s + 0.1)
        assert _samples(gateway)[("splitserve_gateway_registry_feed_synced", ())] == 0.0
    finally:
        await gateway.stop()
        await plain.stop()
