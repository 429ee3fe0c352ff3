"""router.kv_events and router.index_updater against vLLM's real ZmqEventPublisher.

vLLM's publisher (imported in this test only) binds an ipc:// endpoint and a replay ROUTER; gaps
are produced deterministically by dropping chosen sequence numbers on the PUB socket while they
stay in the publisher's replay buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.index_updater import IndexUpdater, IndexUpdaterConfig, coalesced
from router.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventSubscriber,
    Resync,
    SubscriberConfig,
    SubscriberItem,
    decode_batch,
    encode_batch,
)
from router.prefix_index import PrefixIndex
from tests.support.redis import redis_server

import vllm.distributed.kv_events as vkv  # noqa: E402


# -- decoding without vLLM ------------------------------------------------------------------------


def test_decode_roundtrip_and_bytes_hashes() -> None:
    digest = bytes(range(32))
    payload = encode_batch(
        1.5,
        [
            BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[1, 2, 3], block_size=16, medium="GPU"),
            BlockRemoved(block_hashes=[digest], medium="GPU"),
            AllBlocksCleared(),
        ],
        0,
    )
    batch = decode_batch(7, payload)
    assert batch.seq == 7 and batch.ts == 1.5 and batch.data_parallel_rank == 0
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.block_hashes == [1, 2] and stored.token_ids == [1, 2, 3]
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == [int.from_bytes(digest[-8:], "big")]
    assert isinstance(cleared, AllBlocksCleared)


def test_decode_vllm_payload_and_unknown_events() -> None:
    batch = vkv.KVEventBatch(
        ts=2.0,
        events=[
            vkv.BlockStored(block_hashes=[2**64 - 1], parent_block_hash=5, token_ids=list(range(16)), block_size=16,
                            lora_id=None, medium="GPU", lora_name=None, extra_keys=None, group_idx=0,
                            session_id="s"),
            vkv.BlockRemoved(block_hashes=[9], medium="CPU", group_idx=0),
            vkv.AllBlocksCleared(),
        ],
    )
    payload = msgspec.msgpack.encode(batch)
    got = decode_batch(0, payload)
    assert [type(e).__name__ for e in got.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert got.events[0].block_hashes == [2**64 - 1] and got.events[0].parent_block_hash == 5  # type: ignore[union-attr]
    assert got.data_parallel_rank is None
    # A future event type is skipped, the rest of the batch survives.
    raw = msgspec.msgpack.decode(payload)
    raw[1].insert(1, {"type": "BlockMoved", "block_hashes": [1]})
    got = decode_batch(0, msgspec.msgpack.encode(raw))
    assert [type(e).__name__ for e in got.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]


# -- subscriber against vLLM's publisher -------------------------------------------------------------


class _DroppingSocket:
    """Wraps the publisher's PUB socket and silently drops chosen sequence numbers."""

    def __init__(self, sock: Any, drop: set[int]) -> None:
        self.sock, self.drop = sock, drop

    def send_multipart(self, frames: Any, *args: Any, **kwargs: Any) -> Any:
        if int.from_bytes(frames[1], "big") in self.drop:
            return None
        return self.sock.send_multipart(frames, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class Publisher:
    """vLLM's ZmqEventPublisher on ipc endpoints in a temp dir, with injectable drops."""

    def __init__(self, tmp: Path, replay: bool = True, buffer_steps: int = 100, drop: set[int] | None = None) -> None:
        self.endpoint = f"ipc://{tmp}/kv.sock"
        self.replay_endpoint = f"ipc://{tmp}/kv-replay.sock" if replay else None
        self.pub = vkv.ZmqEventPublisher(
            data_parallel_rank=0, endpoint=self.endpoint, replay_endpoint=self.replay_endpoint,
            buffer_steps=buffer_steps, topic="kv",
        )
        self.pub._pub = _DroppingSocket(self.pub._pub, drop or set())
        self.n = 0

    def publish(self, *hashes: int) -> None:
        """One batch storing ``hashes`` (or a removal of hash 0 if none are given)."""
        events: list[Any] = (
            [vkv.BlockStored(block_hashes=list(hashes), parent_block_hash=None, token_ids=[], block_size=16,
                             lora_id=None, medium="GPU", lora_name=None)]
            if hashes else [vkv.BlockRemoved(block_hashes=[0], medium="GPU")]
        )
        self.pub.publish(vkv.KVEventBatch(ts=float(self.n), events=events))
        self.n += 1

    def close(self) -> None:
        self.pub.shutdown()


# PUB/SUB "slow joiner": how long to let a SUB's subscription reach the PUB before publishing.
# Generous, because CI machines are small and busy.
JOIN_S = 1.0


def subscriber(p: Publisher, replay: bool = True) -> KVEventSubscriber:
    return KVEventSubscriber(SubscriberConfig(
        endpoint=p.endpoint, replay_endpoint=p.replay_endpoint if replay else None, topic="kv", replay_timeout_s=2.0,
    ))


async def take(sub: KVEventSubscriber, n: int) -> list[SubscriberItem]:
    return [await asyncio.wait_for(sub.next(), 10) for _ in range(n)]


def seqs(items: list[SubscriberItem]) -> list[int | str]:
    return [i.seq if isinstance(i, EventBatch) else f"resync:{i.reason}" for i in items]


async def test_in_order_stream(tmp_path: Path) -> None:
    p = Publisher(tmp_path, replay=False)
    try:
        async with subscriber(p, replay=False) as sub:
            await asyncio.sleep(JOIN_S)  # PUB/SUB slow joiner
            for i in range(5):
                p.publish(100 + i, 200 + i)
            items = await take(sub, 5)
        assert seqs(items) == [0, 1, 2, 3, 4]
        first = items[0]
        assert isinstance(first, EventBatch) and first.events[0].block_hashes == [100, 200]  # type: ignore[union-attr]
        assert sub.stats.gaps == 0 and sub.stats.resyncs == 0 and sub.stats.events == 5
    finally:
        p.close()


async def test_gap_repaired_by_replay(tmp_path: Path) -> None:
    p = Publisher(tmp_path, drop={2, 3})
    try:
        async with subscriber(p) as sub:
            await asyncio.sleep(JOIN_S)
            for i in range(6):
                p.publish(i + 1)
            items = await take(sub, 6)
        assert seqs(items) == [0, 1, 2, 3, 4, 5]
        assert [i.events[0].block_hashes for i in items] == [[1], [2], [3], [4], [5], [6]]  # type: ignore[union-attr]
        assert sub.stats.gaps == 1 and sub.stats.repaired_gaps == 1 and sub.stats.replayed_batches == 2
        assert sub.stats.resyncs == 0
    finally:
        p.close()


async def test_gap_without_replay_resyncs(tmp_path: Path) -> None:
    p = Publisher(tmp_path, replay=False, drop={1})
    try:
        async with subscriber(p, replay=False) as sub:
            await asyncio.sleep(JOIN_S)
            for i in range(3):
                p.publish(i + 1)
            items = await take(sub, 3)
        assert seqs(items) == [0, "resync:gap", 2]
        resync = items[1]
        assert isinstance(resync, Resync) and resync.expected_seq == 1 and resync.received_seq == 2
    finally:
        p.close()


async def test_gap_beyond_replay_buffer_resyncs(tmp_path: Path) -> None:
    p = Publisher(tmp_path, buffer_steps=2, drop={1, 2, 3, 4})
    try:
        async with subscriber(p) as sub:
            await asyncio.sleep(JOIN_S)
            for i in range(6):
                p.publish(i + 1)
            items = await take(sub, 3)
        assert seqs(items) == [0, "resync:gap", 5]
        assert sub.stats.repaired_gaps == 0
    finally:
        p.close()


async def test_late_join_replays_from_zero(tmp_path: Path) -> None:
    p = Publisher(tmp_path)
    try:
        for i in range(3):
            p.publish(i + 1)
        await asyncio.sleep(JOIN_S)  # published before anyone listened
        async with subscriber(p) as sub:
            await asyncio.sleep(JOIN_S)
            p.publish(4)
            items = await take(sub, 4)
        assert seqs(items) == [0, 1, 2, 3]
        assert sub.stats.replayed_batches == 3
    finally:
        p.close()


async def test_late_join_without_replay_resyncs(tmp_path: Path) -> None:
    p = Publisher(tmp_path, replay=False)
    try:
        p.publish(1)
        await asyncio.sleep(JOIN_S)
        async with subscriber(p, replay=False) as sub:
            await asyncio.sleep(JOIN_S)
            p.publish(2)
            items = await take(sub, 2)
        assert seqs(items) == ["resync:late_join", 1]
    finally:
        p.close()


async def test_publisher_restart_resyncs(tmp_path: Path) -> None:
    p = Publisher(tmp_path, replay=False)
    sub = subscriber(p, replay=False)
    sub.connect()
    try:
        await asyncio.sleep(JOIN_S)
        for i in range(3):
            p.publish(i + 1)
        assert seqs(await take(sub, 3)) == [0, 1, 2]
        p.close()
        p = Publisher(tmp_path, replay=False)  # a new engine process on the same endpoint
        await asyncio.sleep(JOIN_S)  # the SUB reconnects (ZMQ retries on its own schedule)
        # Until the SUB has reconnected, PUB drops what it sends: publish until it is heard,
        # at most twice more, so the new sequence (0, 1 or 2) stays below the old last (2).
        first = None
        for _ in range(3):
            p.publish(7)
            try:
                first = await asyncio.wait_for(sub.next(), JOIN_S * 3)
                break
            except asyncio.TimeoutError:
                continue
        assert first is not None, "the restarted publisher was never heard"
        got = seqs([first, *(await take(sub, 1))])
        assert got[0] == "resync:publisher_restarted" and got[1] in (0, 1, 2), got
    finally:
        sub.close()
        p.close()


# -- updater: publisher -> subscriber -> Redis ------------------------------------------------------


async def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_updater_applies_and_resyncs(tmp_path: Path, r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await r.sadd("splitserve:workers", "w1")
    await r.set("splitserve:worker:w1:alive", "1")
    await idx.apply("w1", [BlockStored(block_hashes=[777])])  # stale entry from a previous life
    p = Publisher(tmp_path, replay=False, drop={3})
    upd = IndexUpdater(idx, IndexUpdaterConfig(
        worker_id="w1",
        subscriber=SubscriberConfig(endpoint=p.endpoint, topic="kv"),
    ))
    upd.start()
    try:
        await asyncio.wait_for(upd.ready.wait(), 10)
        assert await idx.workers_holding(777) == set()  # cleared on start
        await asyncio.sleep(JOIN_S)
        p.publish(1, 2, 3)
        p.publish(4)
        await _wait_for(lambda: _eq(idx.longest_prefixes([1, 2, 3, 4, 5]), {"w1": 4}))
        p.publish(10)  # seq 2
        p.publish(11)  # seq 3: dropped -> gap -> clear
        p.publish(12)  # seq 4
        await _wait_for(lambda: _true(upd.stats.resyncs == 1 and upd.stats.batches == 4))
        assert await idx.longest_prefixes([1, 2]) == {"w1": 0}
        assert await idx.workers_holding(12) == {"w1"}
        assert await idx.worker_block_count("w1") == 1
    finally:
        await upd.stop()
        p.close()


def test_coalesced_merges_consecutive_batches_and_keeps_resyncs_in_place() -> None:
    b = [EventBatch(i, float(i), [BlockStored(block_hashes=[i])]) for i in range(5)]
    gap = Resync("gap", 2, 3)
    out = coalesced([b[0], b[1], gap, b[3], b[4]])
    assert [type(i).__name__ for i in out] == ["EventBatch", "Resync", "EventBatch"]
    first, _, last = out
    assert isinstance(first, EventBatch) and isinstance(last, EventBatch)
    assert (first.seq, first.ts) == (1, 1.0)  # the last merged batch's
    assert [e.block_hashes for e in first.events] == [[0], [1]]  # type: ignore[union-attr]
    assert [e.block_hashes for e in last.events] == [[3], [4]]  # type: ignore[union-attr]
    assert coalesced([b[2]]) == [b[2]] and coalesced([]) == []
    other_rank = EventBatch(5, 5.0, [], data_parallel_rank=1)
    assert len(coalesced([b[0], other_rank])) == 2  # one rank's batches only


async def test_ready_now_returns_what_arrived_without_waiting(tmp_path: Path) -> None:
    p = Publisher(tmp_path, replay=False)
    try:
        async with subscriber(p, replay=False) as sub:
            await asyncio.sleep(JOIN_S)
            assert await sub.ready_now() == []
            for i in range(4):
                p.publish(100 + i)
            first = await asyncio.wait_for(sub.next(), 10)
            await asyncio.sleep(0.3)
            rest = await sub.ready_now()
            assert seqs([first, *rest]) == [0, 1, 2, 3]
            assert await sub.ready_now() == []
    finally:
        p.close()


async def test_updater_applies_several_engine_steps_in_one_write(tmp_path: Path,
                                                                 r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    await r.sadd("splitserve:workers", "w1")
    await r.set("splitserve:worker:w1:alive", "1")
    p = Publisher(tmp_path, replay=False)
    upd = IndexUpdater(idx, IndexUpdaterConfig(
        worker_id="w1", coalesce_s=0.5, subscriber=SubscriberConfig(endpoint=p.endpoint, topic="kv")))
    upd.start()
    try:
        await asyncio.wait_for(upd.ready.wait(), 10)
        await asyncio.sleep(JOIN_S)
        for h in (1, 2, 3, 4):
            p.publish(h)
        p.publish()  # removes block 0 (never stored): applied in order, changes nothing
        await _wait_for(lambda: _eq(idx.longest_prefixes([1, 2, 3, 4]), {"w1": 4}))
        await _wait_for(lambda: _true(upd.stats.batches == 5))
        assert upd.stats.coalesced_writes >= 1 and upd.stats.events == 5, upd.stats
        assert upd.blocks == {1, 2, 3, 4}
    finally:
        await upd.stop()
        p.close()


async def test_updater_hash_cross_check(tmp_path: Path, r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    hasher = BlockHasher(16, "sha256", hash_seed="0")
    upd = IndexUpdater(idx, IndexUpdaterConfig(worker_id="w", subscriber=SubscriberConfig(endpoint="ipc:///nonexistent")),
                       hasher=hasher)
    tokens = list(range(48))
    good = BlockStored(block_hashes=hasher.block_hashes(tokens), token_ids=tokens, block_size=16)
    bad = BlockStored(block_hashes=BlockHasher(16, "sha256", hash_seed="1").block_hashes(tokens), token_ids=tokens,
                      block_size=16)
    await upd.handle(EventBatch(0, 0.0, [good, bad]))
    assert upd.stats.hash_checks == 2 and upd.stats.hash_mismatches == 1


async def test_updater_medium_filter(tmp_path: Path, r: aioredis.Redis) -> None:
    idx = PrefixIndex(r)
    upd = IndexUpdater(idx, IndexUpdaterConfig(
        worker_id="w", subscriber=SubscriberConfig(endpoint="ipc:///nonexistent"), mediums=("GPU",)))
    await upd.handle(EventBatch(0, 0.0, [BlockStored(block_hashes=[1], medium="GPU"),
                                         BlockStored(block_hashes=[2], medium="CPU")]))
    assert await idx.workers_holding(1) == {"w"} and await idx.workers_holding(2) == set()
    assert upd.stats.skipped_events == 1


async def _eq(coro: Any, expected: Any) -> bool:
    return bool(await coro == expected)


async def _true(value: bool) -> bool:
    return value



async def test_updater_survives_redis_outage(tmp_path: Path) -> None:
    p = Publisher(tmp_path, replay=False)
    stack = contextlib.ExitStack()
    first = stack.enter_context(redis_server())
    client = aioredis.Redis.from_url(first.url, socket_timeout=1.0)
    idx = PrefixIndex(client)
    upd = IndexUpdater(idx, IndexUpdaterConfig(
        worker_id="w", subscriber=SubscriberConfig(endpoint=p.endpoint, topic="kv"), retry_backoff_s=0.1))
    upd.start()
    try:
        await asyncio.wait_for(upd.ready.wait(), 10)
        await asyncio.sleep(JOIN_S)
        p.publish(1)
        await _wait_for(lambda: _true(upd.stats.batches == 1))
        stack.close()  # Redis goes away: the next batch cannot be applied
        p.publish(2)
        await _wait_for(lambda: _true(upd.stats.redis_errors >= 1))
        with redis_server(port=first.port):  # ... and comes back, empty
            p.publish(3)
            await _wait_for(lambda: _holders(idx, 3, {"w"}))
            # rebuilt from the updater's mirror of the engine's blocks: what was stored before
            # the outage and what arrived during it, nothing the engine does not hold
            assert await idx.workers_holding(1) == {"w"}
            assert await idx.workers_holding(2) == {"w"}
            assert upd.stats.rebuilds >= 1
        assert not upd._task.done()  # type: ignore[union-attr]

    finally:
        await upd.stop()
        await client.aclose()
        stack.close()
        p.close()


async def _holders(idx: PrefixIndex, block: int, expected: set[str]) -> bool:
    try:
        return await idx.workers_holding(block) == expected
    except Exception:
        return False


async def test_updater_audit_rebuilds_entries_redis_lost_between_events(
        tmp_path: Path, r: aioredis.Redis) -> None:
    p = Publisher(tmp_path, replay=False)
    idx = PrefixIndex(r)
    upd = IndexUpdater(idx, IndexUpdaterConfig(
        worker_id="w", subscriber=SubscriberConfig(endpoint=p.endpoint, topic="kv"),
        audit_interval_s=0.2))
    upd.start()
    try:
        await asyncio.wait_for(upd.ready.wait(), 10)
        await asyncio.sleep(JOIN_S)
        p.publish(1)
        p.publish(2)
        await _wait_for(lambda: _holders(idx, 2, {"w"}))
        await r.flushall()  # no event in flight: only the audit can notice
        await _wait_for(lambda: _holders(idx, 1, {"w"}))
        assert await idx.workers_holding(2) == {"w"} and upd.stats.rebuilds >= 1
    finally:
        await upd.stop()
        p.close()
