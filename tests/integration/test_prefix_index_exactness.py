"""The prefix index against a brute-force oracle, on one Redis and on a real Redis Cluster.

A seeded random run drives six workers' engines: BlockStored of random prefixes of shared
chained "documents", BlockRemoved of random held blocks, AllBlocksCleared, event gaps (the
updater's Resync), worker deaths (alive key deleted, or expired by its TTL) and restarts
(a new life clears its old entries), purges and sweeps, gateway restarts (a fresh reader),
and on the cluster a primary failover (a replica promoted with CLUSTER FAILOVER). Events go
through the real :class:`~router.index_updater.IndexUpdater` logic. After every step, lookups
of random prompts from a separate reader must equal the oracle's longest cached prefix of
every live candidate: in particular they never over-report.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from router.index_updater import IndexUpdater, IndexUpdaterConfig
from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Resync, SubscriberConfig
from router.prefix_index import PrefixIndex
from tests.support.redis import RedisServer, redis_server
from tests.support.redis_cluster import RedisClusterServer, redis_cluster

NS = "splitserve"
WORKERS = [f"w{i}" for i in range(6)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    """3 primaries + 3 replicas for the module."""
    with redis_cluster(3, 1) as c:
        yield c


@pytest.fixture(scope="module")
def single() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@contextlib.asynccontextmanager
async def client(kind: str, single: RedisServer, cluster: RedisClusterServer
                 ) -> AsyncIterator[aioredis.Redis | RedisCluster]:
    if kind == "cluster":
        c: aioredis.Redis | RedisCluster = RedisCluster.from_url(cluster.url)
        await c.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        c = aioredis.Redis.from_url(single.url)
        await c.flushall()
    try:
        yield c
    finally:
        await c.aclose()


class Oracle:
    """What each engine holds and who is alive: the ground truth."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {w: set() for w in WORKERS}
        self.alive: dict[str, bool] = dict.fromkeys(WORKERS, False)

    def longest(self, prompt: list[int], candidates: list[str]) -> dict[str, int]:
        out = {}
        for w in dict.fromkeys(candidates):
            if not self.alive[w]:
                continue
            n = 0
            while n < len(prompt) and prompt[n] in self.held[w]:
                n += 1
            out[w] = n
        return out


def _updater(index: PrefixIndex, w: str) -> IndexUpdater:
    return IndexUpdater(index, IndexUpdaterConfig(
        worker_id=w, subscriber=SubscriberConfig(endpoint="ipc:///nonexistent"), audit_interval_s=0))


async def _failover(cluster: RedisClusterServer) -> None:
    primary = cluster.primaries()[0]
    replica = cluster.replica_of(primary)
    with contextlib.closing(cluster.node(replica)) as c:
        c.execute_command("CLUSTER", "FAILOVER")  # graceful: the replica catches up first
    deadline = time.monotonic() + 20
    while replica not in cluster.primaries():
        assert time.monotonic() < deadline, "replica not promoted"
        await asyncio.sleep(0.1)
    cluster.wait_ok()


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_lookups_match_a_brute_force_oracle(kind: str, single: RedisServer,
                                                  cluster: RedisClusterServer) -> None:
    rng = random.Random(18)
    docs = [[rng.getrandbits(64) for _ in range(24)] for _ in range(12)]
    for d in docs[6:]:  # half the documents share a 6-block "system prompt"
        d[:6] = docs[0][:6]
    oracle = Oracle()
    async with client(kind, single, cluster) as r:
        # bucket_bits=8: few buckets, so members of many workers and blocks share them
        writer = PrefixIndex(r, NS, bucket_bits=8)
        readers = [PrefixIndex(r, NS, bucket_bits=8)]
        updaters = {w: _updater(writer, w) for w in WORKERS}

        async def live(w: str) -> None:
            await r.sadd(f"{NS}:workers", w)
            await r.set(f"{NS}:worker:{w}:alive", "1", px=60_000)
            oracle.alive[w] = True

        for w in WORKERS:
            await live(w)
        checks = over = 0
        failed_over = False
        for step in range(400):
            w = rng.choice(WORKERS)
            u = updaters[w]
            op = rng.random()
            if op < 0.67 and not oracle.alive[w]:
                op = 0.75  # a dead worker publishes nothing: restart it instead
            if op < 0.45:  # a prompt's blocks computed: a prefix of a document, maybe extended
                d = rng.choice(docs)
                n = rng.randint(1, len(d))
                events = [BlockStored(block_hashes=d[:n])]
                if rng.random() < 0.3 and oracle.held[w]:
                    gone = rng.sample(sorted(oracle.held[w]), rng.randint(1, min(4, len(oracle.held[w]))))
                    events.append(BlockRemoved(block_hashes=gone))
                if rng.random() < 0.05:
                    events.insert(rng.randrange(len(events) + 1), AllBlocksCleared())
                await u.handle(EventBatch(step, 0.0, events))
                for e in events:
                    if isinstance(e, BlockStored):
                        oracle.held[w].update(e.block_hashes)  # type: ignore[arg-type]
                    elif isinstance(e, BlockRemoved):
                        oracle.held[w].difference_update(e.block_hashes)  # type: ignore[arg-type]
                    else:
                        oracle.held[w].clear()
            elif op < 0.62 and oracle.held[w]:  # evictions
                gone = rng.sample(sorted(oracle.held[w]), rng.randint(1, len(oracle.held[w])))
                await u.handle(EventBatch(step, 0.0, [BlockRemoved(block_hashes=gone)]))
                oracle.held[w].difference_update(gone)
            elif op < 0.67:  # a gap in the event stream: the updater forgets and clears
                await u.handle(Resync("gap", step, step + 2))
                oracle.held[w].clear()
            elif op < 0.74 and oracle.alive[w]:  # the worker dies; its entries stay in Redis
                if rng.random() < 0.5:
                    await r.delete(f"{NS}:worker:{w}:alive")
                else:  # ... or its alive key simply expires
                    await r.pexpire(f"{NS}:worker:{w}:alive", 1)
                    await asyncio.sleep(0.005)
                oracle.alive[w] = False
            elif op < 0.80 and not oracle.alive[w]:  # restart: a new life clears on start
                updaters[w] = u = _updater(writer, w)
                await writer.clear_worker(w)
                await live(w)
                oracle.held[w].clear()
            elif op < 0.84:  # a gateway purges the dead and sweeps retired epochs
                await rng.choice(readers).purge_dead()
            elif op < 0.86:  # a gateway restarts: a fresh reader, nothing cached
                readers = [*readers[-1:], PrefixIndex(r, NS, bucket_bits=8)]
            elif kind == "cluster" and not failed_over and step > 200:
                await _failover(cluster)
                failed_over = True
            for _ in range(3):
                d = rng.choice(docs)
                prompt = d[: rng.randint(1, len(d))] + ([rng.getrandbits(64)] if rng.random() < 0.2 else [])
                cands = rng.sample(WORKERS, rng.randint(1, len(WORKERS)))
                for reader in readers:
                    got = await reader.longest_prefixes(prompt, cands)
                    want = oracle.longest(prompt, cands)
                    over += sum(1 for k, v in got.items() if v > want.get(k, -1))
                    assert got == want, (step, got, want)
                    checks += 1
        assert checks >= 1200 and over == 0
        assert kind == "single" or failed_over
        # the exact per-worker counts, and after purging the dead and a sweep, no member of a
        # retired epoch is left anywhere
        for w in WORKERS:
            if oracle.alive[w]:
                assert await writer.worker_block_count(w) == len(oracle.held[w])
        await readers[-1].purge_dead()
        keys = [k async for k in r.scan_iter(match=writer.bucket_pattern(), count=1000)]
        total = 0
        for k in keys:
            total += await r.zcard(k)
        assert total == sum(len(oracle.held[w]) for w in WORKERS if oracle.alive[w])
        for x in (writer, *readers):
            await x.aclose()


async def test_liveness_cache_drops_an_expired_worker_on_time(cluster: RedisClusterServer) -> None:
    """With liveness_cache_s, a worker whose alive key expires stops counting when it expires,
    though the reader reads no alive key while the cached TTL lasts."""
    async with client("cluster", None, cluster) as r:  # type: ignore[arg-type]
        writer = PrefixIndex(r, NS)
        reader = PrefixIndex(r, NS, liveness_cache_s=5.0)
        await r.set(f"{NS}:worker:a:alive", "1", px=60_000)
        await r.set(f"{NS}:worker:b:alive", "1", px=400)
        for w in ("a", "b"):
            await writer.add_blocks(w, [1, 2, 3])
        assert await reader.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 3}
        assert reader.nodes._clients  # the lookup went out as plain per-node pipelines
        await asyncio.sleep(0.5)
        assert await reader.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 3}
        # a clear anywhere bumps the epoch map's version: the reader re-reads it at once
        await writer.clear_worker("a", [1, 2, 3])
        assert await reader.longest_prefixes([1, 2, 3], ["a"]) == {"a": 0}
        await reader.aclose()
        await writer.aclose()
