"""router.prefix_index against a real, private redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from router.prefix_index import PrefixIndex
from tests.support.redis import RedisServer


NS = "splitserve"


async def register(r: aioredis.Redis, *workers: str, alive: bool = True, ttl_ms: int | None = None) -> None:
    """Mimic router.registry: member of {ns}:workers, plus an alive key (optionally with a TTL)."""
    for w in workers:
        await r.sadd(f"{NS}:workers", w)
        await r.hset(f"{NS}:worker:{w}", mapping={"worker_id": w, "role": "both"})
        if alive:
            await r.set(f"{NS}:worker:{w}:alive", "1", px=ttl_ms)


async def test_stored_removed_cleared(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await register(r, "w1")
    await idx.apply("w1", [BlockStored(block_hashes=[1, 2, 3], token_ids=[], block_size=16)])
    assert await idx.worker_block_count("w1") == 3
    assert await idx.workers_holding(2) == {"w1"}
    await idx.apply("w1", [BlockRemoved(block_hashes=[2])])
    assert await idx.workers_holding(2) == set()
    assert await r.zcard(idx.block_key(2)) == 2  # 1, 2 and 3 share a bucket; 2's member is gone
    assert await idx.worker_block_count("w1") == 2
    await idx.apply("w1", [AllBlocksCleared()])
    assert await idx.worker_block_count("w1") == 0
    assert await idx.longest_prefixes([1]) == {"w1": 0}
    # the retired epoch's members stay until a sweep; then no bucket is left
    assert [k async for k in r.scan_iter(idx.bucket_pattern())] != []
    assert await idx.purge_dead() == []  # w1 is alive: nothing to retire, but the sweep runs
    assert [k async for k in r.scan_iter(idx.bucket_pattern())] == []
    assert await r.zcard(idx.retired_key) == 0


async def test_events_apply_in_order(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await register(r, "w1")
    await idx.apply("w1", [BlockStored(block_hashes=[5]), BlockRemoved(block_hashes=[5]), BlockStored(block_hashes=[6])])
    assert await idx.workers_holding(5) == set() and await idx.workers_holding(6) == {"w1"}
    await idx.apply("w1", [BlockRemoved(block_hashes=[6]), BlockStored(block_hashes=[6])])
    assert await idx.workers_holding(6) == {"w1"}
    # Blocks stored before a clear in the same batch are gone; those after it stay.
    await idx.apply("w1", [BlockStored(block_hashes=[7]), AllBlocksCleared(), BlockStored(block_hashes=[8])])
    assert await idx.workers_holding(6) == set() and await idx.workers_holding(7) == set()
    assert await idx.workers_holding(8) == {"w1"}
    # Re-announcing a block (reuse) is idempotent; removing an unknown block is harmless.
    await idx.apply("w1", [BlockStored(block_hashes=[8]), BlockRemoved(block_hashes=[99])])
    assert await idx.worker_block_count("w1") == 1


async def test_full_64_bit_hashes_roundtrip(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await register(r, "w1")
    hashes = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0xDEADBEEFCAFEBABE]
    await idx.apply("w1", [BlockStored(block_hashes=list(hashes))])
    assert await idx.longest_prefixes(hashes) == {"w1": len(hashes)}
    assert await idx.longest_prefixes([2**64 - 2]) == {"w1": 0}


async def test_longest_prefix_semantics(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await register(r, "a", "b", "c", "d")
    prompt = [11, 12, 13, 14, 15, 16]
    await idx.apply("a", [BlockStored(block_hashes=prompt[:4])])
    await idx.apply("b", [BlockStored(block_hashes=[11, 12, 14, 15, 16])])  # hole at block 2
    await idx.apply("c", [BlockStored(block_hashes=[12, 13, 14])])  # no first block
    await idx.apply("d", [BlockStored(block_hashes=prompt)])
    assert await idx.longest_prefixes(prompt) == {"a": 4, "b": 2, "c": 0, "d": 6}
    assert await idx.longest_prefixes(prompt[:3]) == {"a": 3, "b": 2, "c": 0, "d": 3}
    assert await idx.longest_prefixes([99, *prompt]) == {"a": 0, "b": 0, "c": 0, "d": 0}
    assert await idx.longest_prefixes([]) == {"a": 0, "b": 0, "c": 0, "d": 0}
    # Restricting the candidates; unknown/dead ids are left out, duplicates collapse.
    assert await idx.longest_prefixes(prompt, ["b", "a", "zz", "a"]) == {"b": 2, "a": 4}
    assert await idx.longest_prefixes(prompt, []) == {}


async def test_dead_workers_excluded_and_purged(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await register(r, "live")
    await register(r, "short", ttl_ms=300)
    await register(r, "gone")
    await register(r, "never", alive=False)
    for w in ("live", "short", "gone", "never"):
        await idx.apply(w, [BlockStored(block_hashes=[1, 2, 3])])
    assert await idx.longest_prefixes([1, 2, 3]) == {"live": 3, "short": 3, "gone": 3}
    await r.delete(f"{NS}:worker:gone:alive")
    assert await idx.longest_prefixes([1, 2, 3]) == {"live": 3, "short": 3}
    await asyncio.sleep(0.45)  # the TTL of "short" runs out
    assert await idx.longest_prefixes([1, 2, 3]) == {"live": 3}
    assert await idx.longest_prefixes([1, 2, 3], ["short", "never"]) == {}
    assert sorted(await idx.purge_dead()) == ["gone", "never", "short"]
    assert await idx.workers_holding(1) == {"live"}
    assert await idx.purge_dead() == []
    # A worker that comes back counts again once it re-publishes.
    await register(r, "gone")
    assert await idx.longest_prefixes([1, 2, 3]) == {"live": 3, "gone": 0}


async def test_lookup_is_one_round_trip(r: aioredis.Redis, redis_srv: RedisServer) -> None:
    idx = PrefixIndex(r)
    await register(r, *[f"w{i}" for i in range(8)])
    for i in range(8):
        await idx.apply(f"w{i}", [BlockStored(block_hashes=list(range(100, 100 + 8 * i)))])
    prompt = list(range(100, 164))
    await r.script_flush()  # the first call after a flush must still work (NOSCRIPT -> load -> retry)
    warm = await idx.longest_prefixes(prompt)
    assert warm == {f"w{i}": 8 * i for i in range(8)}

    monitor_client = aioredis.Redis.from_url(redis_srv.url)
    seen: list[dict[str, str]] = []
    async with monitor_client.monitor() as mon:

        async def reader() -> None:
            while True:
                seen.append(await mon.next_command())

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.1)
        # with the candidates given (as the gateway does); None reads the registry set first
        assert await idx.longest_prefixes(prompt, [f"w{i}" for i in range(8)]) == warm
        await asyncio.sleep(0.2)
        task.cancel()
    await monitor_client.aclose()
    from_client = [c["command"].split()[0].upper() for c in seen if c["client_type"] != "lua"]
    assert from_client == ["EVALSHA"], seen[:5]
    # every key the script touches is declared (a Redis Cluster routes on them)
    evalsha = next(c["command"] for c in seen if c["client_type"] != "lua").split()
    declared = {a.strip('"') for a in evalsha[3:3 + int(evalsha[2].strip('"'))]}
    touched = {c["command"].split()[1].strip('"') for c in seen if c["client_type"] == "lua"}
    assert touched and touched <= declared, touched - declared
    assert any(c["client_type"] == "lua" for c in seen)  # the work happened server-side


async def test_clear_worker_in_chunks_keeps_others(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r, max_ops_per_call=700, clear_chunk=500)
    await register(r, "big", "other")
    hashes = list(range(1, 5001))
    await idx.apply("big", [BlockStored(block_hashes=hashes)])
    await idx.apply("other", [BlockStored(block_hashes=hashes[:10])])
    assert await idx.worker_block_count("big") == 5000
    assert await idx.longest_prefixes(hashes[:64]) == {"big": 64, "other": 10}
    await idx.clear_worker("big")
    assert await idx.worker_block_count("big") == 0
    assert await idx.longest_prefixes(hashes[:64]) == {"big": 0, "other": 10}
    assert await r.hexists(idx.ids_key, "big") == 0
    await idx.sweep()
    members = [m for k in [k async for k in r.scan_iter(idx.bucket_pattern(), count=1000)]
               for m in await r.zrange(k, 0, -1)]
    assert len(members) == 10


async def test_clear_with_known_blocks_deletes_them_at_once(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r, bucket_bits=4)
    await register(r, "w")
    hashes = [(i << 58) | i for i in range(40)]  # spread over the 16 buckets
    await idx.add_blocks("w", hashes)
    assert await idx.worker_block_count("w") == 40
    await idx.clear_worker("w", hashes)
    assert [k async for k in r.scan_iter(idx.bucket_pattern())] == []
    assert await idx.worker_block_count("w") == 0
    await idx.add_blocks("w", hashes[:3])  # a new epoch
    assert await idx.longest_prefixes(hashes) == {"w": 3}
    assert await idx.longest_prefixes(hashes[3:]) == {"w": 0}


async def test_bytes_per_pair_is_small(r: aioredis.Redis) -> None:
    """The layout's memory per (block, worker) pair, measured by MEMORY USAGE: the issue's
    budget is 64 bytes; listpack buckets of ~100 members are ~25."""
    idx = PrefixIndex(r, bucket_bits=6)
    await register(r, "a", "b")
    import random
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(4000)]
    await idx.add_blocks("a", hashes)
    await idx.add_blocks("b", hashes[:2000])
    keys = [k async for k in r.scan_iter(idx.bucket_pattern())]
    used = sum([await r.memory_usage(k, samples=0) for k in keys])
    assert used / 6000 <= 64, used / 6000


async def test_namespaces_are_isolated_and_decode_responses(redis_srv: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_srv.url, decode_responses=True)
    await client.flushdb()
    try:
        one, two = PrefixIndex(client, "one"), PrefixIndex(client, "two")
        for ns in ("one", "two"):
            await client.sadd(f"{ns}:workers", "w")
            await client.set(f"{ns}:worker:w:alive", "1")
        await one.apply("w", [BlockStored(block_hashes=[1, 2])])
        assert await one.longest_prefixes([1, 2]) == {"w": 2}
        assert await two.longest_prefixes([1, 2]) == {"w": 0}
    finally:
        await client.aclose()


async def test_writers_and_replicas_of_another_layout_are_refused(r: aioredis.Redis) -> None:
    from redis.exceptions import ResponseError

    from router.index_replica import IndexReplica

    await PrefixIndex(r, bucket_bits=8, partitions=2).add_blocks("w1", [1])
    with pytest.raises(ResponseError, match="LAYOUT"):
        await PrefixIndex(r, bucket_bits=8, partitions=3).add_blocks("w2", [1])
    with pytest.raises(ValueError, match="partitions=2"):
        await IndexReplica(PrefixIndex(r, bucket_bits=9, partitions=2)).start()


async def test_writes_intact_tells_lost_writes_from_old_trimmed_ones(r: aioredis.Redis) -> None:
    idx = PrefixIndex(r, bucket_bits=4, partitions=1)
    await idx.add_blocks("w1", [1, 2])
    assert await idx.writes_intact("w1") and await idx.writes_intact("never-written")
    log = idx.layout.log_key(0)
    last = (await r.xrevrange(log, count=1))[0][0]
    await r.xdel(log, last)  # a failover's promoted replica lacks the last write
    assert not await idx.writes_intact("w1")
    await idx.add_blocks("w1", [3])  # written again: intact
    assert await idx.writes_intact("w1")
    await idx.add_blocks("w2", [4])  # newer entries, then the old ones trimmed away
    await r.xtrim(log, maxlen=1, approximate=False)
    assert await idx.writes_intact("w1")
    await idx.clear_worker("w1")
    assert await idx.writes_intact("w1")  # a new epoch: nothing written under it yet
