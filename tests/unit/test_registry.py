"""The worker registry against a real Redis: register, heartbeat, liveness expiry, roles."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from router.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerRole, WorkerState


def info(wid: str, role: WorkerRole = WorkerRole.DECODE) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address=f"127.0.0.1:{1000 + len(wid)}",
                      model="m", metrics_url="http://127.0.0.1:1/metrics", pid=42)


async def test_register_heartbeat_roundtrip(r: Redis) -> None:
    reg = WorkerRegistry(r, "t", ttl_s=5)
    await reg.register(info("d0"))
    await reg.register(info("p0", WorkerRole.PREFILL))
    d0 = info("d0")
    d0.load = WorkerLoad(in_flight=3, num_running_reqs=2, num_waiting_reqs=1,
                         kv_cache_usage=0.25, updated_at=1.5)
    assert await reg.heartbeat(d0) is True
    live = await reg.live_workers()
    assert [w.worker_id for w in live] == ["d0", "p0"]
    d0 = live[0]
    assert d0.role == WorkerRole.DECODE and d0.pid == 42
    assert d0.load == WorkerLoad(in_flight=3, num_running_reqs=2, num_waiting_reqs=1,
                                 kv_cache_usage=0.25, updated_at=1.5)
    only_prefill = await reg.live_workers(roles=[WorkerRole.PREFILL])
    assert [w.worker_id for w in only_prefill] == ["p0"]


async def test_dead_worker_disappears_when_liveness_expires(r: Redis) -> None:
    reg = WorkerRegistry(r, "t", ttl_s=1.0)
    await reg.register(info("d0"))
    await reg.register(info("d1"))
    assert len(await reg.live_workers()) == 2
    for _ in range(8):  # d1 keeps beating, d0 is dead
        await asyncio.sleep(0.2)
        await reg.heartbeat(info("d1"))
    assert [w.worker_id for w in await reg.live_workers()] == ["d1"]


async def test_deregister_and_pruning(r: Redis) -> None:
    reg = WorkerRegistry(r, "t", ttl_s=5)
    await reg.register(info("d0"))
    await reg.deregister("d0")
    assert await reg.live_workers() == []
    assert await r.smembers("t:workers") == set()
    # an id whose info vanished is pruned from the set by the next read
    await r.sadd("t:workers", "ghost")
    assert await reg.live_workers() == []
    assert await r.smembers("t:workers") == set()


async def test_namespaces_are_separate(r: Redis) -> None:
    await WorkerRegistry(r, "a").register(info("x"))
    assert await WorkerRegistry(r, "b").live_workers() == []


async def test_heartbeat_registers_again_after_redis_lost_the_entry(r: Redis) -> None:
    reg = WorkerRegistry(r, "t", ttl_s=5)
    d0 = info("d0")
    await reg.register(d0)
    await r.flushall()  # a Redis restart without persistence
    assert await reg.live_workers() == []
    assert await reg.heartbeat(d0) is False  # noticed and written again
    live = await reg.live_workers()
    assert [w.worker_id for w in live] == ["d0"] and live[0].address == d0.address
    assert await reg.heartbeat(d0) is True


async def test_draining_state_is_published(r: Redis) -> None:
    reg = WorkerRegistry(r, "t", ttl_s=5)
    d0 = info("d0")
    await reg.register(d0)
    assert (await reg.live_workers())[0].state == WorkerState.SERVING
    await reg.set_state("d0", WorkerState.DRAINING)
    assert (await reg.live_workers())[0].state == WorkerState.DRAINING
    d0.state = WorkerState.DRAINING
    await reg.heartbeat(d0)  # a heartbeat keeps the state it carries
    assert (await reg.live_workers())[0].state == WorkerState.DRAINING
