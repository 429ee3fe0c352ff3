"""router.index_replica against a real, private redis-server: warm-up, following, staleness."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from router.index_replica import IndexReplica, IndexReplicaConfig
from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from router.prefix_index import PrefixIndex
from router.replicated_index import ReplicatedPrefixIndex, open_prefix_index
from tests.support.redis import redis_server

NS = "splitserve"


async def eventually(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def visible(rep: IndexReplica, prompt: list[int], want: dict[str, int]):
    return lambda: rep.longest_prefixes(prompt) == want


async def test_lookup_lists_the_holders_per_prefix_length(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r, NS, bucket_bits=4, partitions=3)
    prompt = [0x1000_0000_0000_0000 * i + 7 for i in range(1, 9)]
    depths = {"a": 8, "b": 2, "c": 2, "d": 5, "e": 1, "f": 5}
    for w, n in depths.items():
        await idx.add_blocks(w, prompt[:n])
    await idx.add_blocks("g", prompt[1:])  # not the first block: holds no prefix
    rep = IndexReplica(idx)
    await rep.start()
    try:
        got = rep.longest_prefixes(prompt)
        assert got == depths
        assert [(n, sorted(ws)) for n, ws in got.levels] == [
            (8, ["a"]), (5, ["d", "f"]), (2, ["b", "c"]), (1, ["e"])]
        lazy = rep.longest_prefixes(iter(prompt), eligible={"b", "d", "g"})
        assert lazy == {"b": 2, "d": 5} and lazy.levels == [(5, ["d"]), (2, ["b"])]
        assert rep.longest_prefixes(prompt[:3]) == {w: min(n, 3) for w, n in depths.items()}
        assert rep.longest_prefixes(iter([])) == {}
    finally:
        await rep.stop()


async def test_warms_from_redis_then_follows_every_change(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r, NS, bucket_bits=4, partitions=3)
    prompt = [0x1000_0000_0000_0000 * i + 7 for i in range(1, 9)]  # spread over partitions
    await idx.add_blocks("a", prompt[:5])
    await idx.add_blocks("b", prompt)
    await idx.add_blocks("gone", prompt)
    await idx.clear_worker("gone")  # retired before the replica starts: never counted
    rep = IndexReplica(idx)
    await rep.start()
    try:
        assert rep.synced()
        assert rep.longest_prefixes(prompt) == {"a": 5, "b": 8}
        assert rep.longest_prefixes(prompt, eligible={"a"}) == {"a": 5}
        assert rep.longest_prefixes([99, *prompt]) == {}
        await idx.apply("c", [BlockStored(block_hashes=prompt[:3])])
        await eventually(visible(rep, prompt, {"a": 5, "b": 8, "c": 3}))
        await idx.apply("b", [BlockRemoved(block_hashes=[prompt[6]])])
        await eventually(visible(rep, prompt, {"a": 5, "b": 6, "c": 3}))
        await idx.apply("a", [AllBlocksCleared(), BlockStored(block_hashes=prompt[:1])])
        await eventually(visible(rep, prompt, {"a": 1, "b": 6, "c": 3}))
        await idx.clear_worker("c", prompt[:3])  # retired, and its members removed
        await eventually(visible(rep, prompt, {"a": 1, "b": 6}))
        await eventually(lambda: rep.holders(prompt[0]) == {"a", "b"})
        # the crashed worker's leftovers (retired, never deleted) leave with the sweep
        assert sorted(await idx.purge_dead()) == ["a", "b"]  # no alive keys in this test
        await eventually(lambda: rep.pairs == 0)
        assert rep.stats.entries > 0 and rep.lag_percentile(0.99) is not None
    finally:
        await rep.stop()


async def test_blocks_of_several_holders_keep_the_replica_out_of_the_collector(
        r: aioredis.Redis) -> None:
    """The replica's per-block dicts hold ints only (several holders are listed apart), so
    the cyclic garbage collector never walks them: warmed, then followed, as holders come
    and go (a block going from one holder to several and back)."""
    idx = PrefixIndex(r, NS, bucket_bits=4, partitions=3)
    prompt = [0x1000_0000_0000_0000 * i + 7 for i in range(1, 9)]
    await idx.add_blocks("a", prompt)
    await idx.add_blocks("b", prompt[:4])
    rep = IndexReplica(idx)
    collecting = gc.isenabled()
    gc.disable()  # no collection meanwhile: one would untrack a dict until its next tuple
    await rep.start()
    try:
        assert rep.longest_prefixes(prompt) == {"a": 8, "b": 4} and rep.pairs == 12
        await idx.apply("c", [BlockStored(block_hashes=prompt[:6])])
        await eventually(visible(rep, prompt, {"a": 8, "b": 4, "c": 6}))
        assert rep.pairs == 18 and rep.holders(prompt[0]) == {"a", "b", "c"}
        assert not any(gc.is_tracked(d) for d in rep._parts)
        await idx.apply("b", [BlockRemoved(block_hashes=prompt[:4])])
        await idx.apply("a", [BlockRemoved(block_hashes=prompt[2:])])
        await eventually(visible(rep, prompt, {"a": 2, "c": 6}))
        assert rep.pairs == 8 and rep.holders(prompt[5]) == {"c"}
        assert rep.holders(prompt[1]) == {"a", "c"} and rep.holders(prompt[7]) == set()
        assert not any(gc.is_tracked(d) for d in rep._parts)
    finally:
        if collecting:
            gc.enable()
        await rep.stop()


async def test_the_walk_hashes_only_what_it_needs(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r, NS, bucket_bits=4, partitions=2)
    await idx.add_blocks("a", [1, 2, 3])
    rep = IndexReplica(idx)
    await rep.start()
    try:
        taken: list[int] = []

        def hashes() -> Iterator[int]:
            for h in (1, 2, 3, 4, 5, 6):
                taken.append(h)
                yield h

        assert rep.longest_prefixes(hashes()) == {"a": 3}
        assert taken == [1, 2, 3, 4]  # nobody holds block 4: blocks 5 and 6 never hashed
    finally:
        await rep.stop()


async def test_a_stale_replica_under_reports_and_warms_again_after_redis_restarts() -> None:
    with redis_server() as srv:
        client = aioredis.Redis.from_url(srv.url)
        idx = PrefixIndex(client, NS, bucket_bits=4, partitions=2)
        await idx.add_blocks("a", [1, 2, 3])
        rep = IndexReplica(idx, IndexReplicaConfig(max_staleness_s=0.3, retry_s=0.05))
        await rep.start()
        try:
            assert rep.longest_prefixes([1, 2, 3]) == {"a": 3}
            srv.stop()  # Redis is gone: what it removes meanwhile is unknown here
            await asyncio.sleep(0.5)
            assert not rep.synced()
            assert rep.longest_prefixes([1, 2, 3]) == {}  # under-reports, never over-reports
            srv.start()  # back, empty (no persistence): the logs lost the replica's position
            await eventually(rep.synced)
            assert rep.longest_prefixes([1, 2, 3]) == {}
            writer = PrefixIndex(client, NS, bucket_bits=4, partitions=2)  # a new epoch
            await writer.add_blocks("a", [1, 2])
            await eventually(visible(rep, [1, 2, 3], {"a": 2}))
            assert rep.stats.errors > 0 and rep.stats.warms > 3
        finally:
            await rep.stop()
            await client.aclose()


async def test_a_log_trimmed_past_the_replica_makes_it_warm_again(r: aioredis.Redis,
                                                                  redis_srv) -> None:
    idx = PrefixIndex(r, NS, bucket_bits=2, partitions=1)
    await idx.add_blocks("a", [1])
    cid = await idx.epoch("a")
    rep = IndexReplica(idx, IndexReplicaConfig(read_count=5))
    await rep.start()
    try:
        await eventually(visible(rep, [1], {"a": 1}))
        warms = rep.stats.warms
        # the event loop stalls (no read) while 20 changes are written and the log is
        # trimmed to its last 8: the replica misses "remove 1" but must not keep block 1
        sync = redis.Redis.from_url(redis_srv.url)
        bucket, log = idx.block_key(1), idx.layout.log_key(0)
        sync.zrem(bucket, f"{1:016x}{cid}")
        sync.xadd(log, {"c": cid, "a": "", "r": f"{1:016x}"})
        for h in range(2, 21):
            sync.zadd(bucket, {f"{h:016x}{cid}": 0})
            sync.xadd(log, {"c": cid, "a": f"{h:016x}", "r": ""})
        sync.xtrim(log, maxlen=8, approximate=False)
        sync.close()
        await eventually(visible(rep, [20], {"a": 1}))
        assert rep.longest_prefixes([1]) == {}
        assert rep.holders(2) == {"a"}  # trimmed away from the log, but warmed from the bucket
        assert rep.stats.warms == warms + 1
    finally:
        await rep.stop()


def test_read_count_above_the_log_length_is_refused() -> None:
    idx = PrefixIndex(aioredis.Redis(), NS, log_maxlen=100)
    with pytest.raises(ValueError):
        IndexReplica(idx, IndexReplicaConfig(read_count=101))


async def test_a_replicated_index_reads_the_replica_while_it_is_synced(r: aioredis.Redis) -> None:
    idx = ReplicatedPrefixIndex(r, NS, replica=IndexReplicaConfig(), bucket_bits=4, partitions=2)
    for w in ("a", "b"):
        await r.sadd(f"{NS}:workers", w)
        await r.set(f"{NS}:worker:{w}:alive", "1")
    await idx.add_blocks("a", [1, 2, 3])
    try:
        # not started: Redis answers (every live candidate, 0 for those holding nothing)
        assert await idx.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 0}
        await idx.start()
        assert await idx.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 3}
        assert await idx.longest_prefixes(iter([1, 2]), ["b"]) == {}
        assert (idx.reads.replica, idx.reads.redis) == (2, 1)
        assert await idx.longest_prefixes([1, 2, 3]) == {"a": 3, "b": 0}  # None: Redis's liveness
    finally:
        await idx.aclose()


async def test_a_gateway_starts_with_redis_away_and_its_replica_warms_later() -> None:
    with redis_server() as srv:
        client = aioredis.Redis.from_url(srv.url)
        srv.stop()
        idx = await open_prefix_index(client, NS, IndexReplicaConfig(retry_s=0.05))
        try:
            assert isinstance(idx, ReplicatedPrefixIndex) and not idx.replica.synced()
            srv.start()
            await PrefixIndex(client, NS).add_blocks("a", [7])
            await eventually(idx.replica.synced)
            await eventually(visible(idx.replica, [7], {"a": 1}))
        finally:
            await idx.aclose()
            await client.aclose()
    assert isinstance(await open_prefix_index(client, NS), PrefixIndex)


async def test_an_index_on_its_own_redis_reads_liveness_from_the_registry(
        r: aioredis.Redis, monkeypatch) -> None:
    """SPLITSERVE_REDIS_INDEX_URL: the index on another Redis (here a second server; a Redis
    Cluster in tests/integration), the registry's liveness keys where they are."""
    with redis_server() as other:
        monkeypatch.setenv("SPLITSERVE_REDIS_INDEX_URL", other.url)
        for w in ("a", "b"):
            await r.sadd(f"{NS}:workers", w)
        await r.set(f"{NS}:worker:a:alive", "1")  # b is dead
        for replica in (None, IndexReplicaConfig()):
            idx = await open_prefix_index(r, NS, replica)
            try:
                assert idx.redis is not r and idx.registry is r
                for w in ("a", "b"):
                    await idx.add_blocks(w, [1, 2])
                assert await r.exists(idx.block_key(1)) == 0  # not on the registry's Redis
                idx_only = PrefixIndex(idx.redis, NS)
                assert await idx_only.workers_holding(1) == {"a", "b"}
                if replica is not None:
                    await eventually(lambda: idx.replica.holders(2) == {"a", "b"})
                # the gateway passes its live workers; None: the registry's set and alive keys
                assert await idx.longest_prefixes([1, 2]) == {"a": 2}
                assert await idx.purge_dead() == ["b"]
            finally:
                await idx.aclose()
            flush = aioredis.Redis.from_url(other.url)
            await flush.flushall()
            await flush.aclose()
