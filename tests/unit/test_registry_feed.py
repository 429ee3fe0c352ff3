"""router.registry_feed against a real, private redis-server: registry changes pushed."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from router.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerRole, WorkerState
from router.registry_feed import RegistryFeed, RegistryFeedConfig
from tests.support.redis import redis_server

NS = "feed"


def _info(wid: str, running: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=WorkerRole.BOTH, address="127.0.0.1:1", model="m",
                      load=WorkerLoad(num_running_reqs=running, updated_at=time.time()))


async def eventually(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def view(feed: RegistryFeed) -> dict[str, tuple[str, int]]:
    return {w.worker_id: (w.state.value, w.load.num_running_reqs) for w in feed.live()}


async def test_the_feed_follows_every_registry_change(r: aioredis.Redis) -> None:
    reg = WorkerRegistry(r, NS, ttl_s=60)
    await reg.register(_info("a"))
    feed = RegistryFeed(r, NS)
    await feed.start()
    try:
        assert feed.synced() and view(feed) == {"a": ("serving", 0)}
        await reg.register(_info("b"))
        await eventually(lambda: view(feed) == {"a": ("serving", 0), "b": ("serving", 0)})
        await reg.heartbeat(_info("a", running=3))
        await eventually(lambda: view(feed)["a"] == ("serving", 3))
        await reg.set_state("b", WorkerState.DRAINING)
        await eventually(lambda: view(feed)["b"] == ("draining", 0))
        await reg.deregister("a")
        await eventually(lambda: view(feed) == {"b": ("draining", 0)})
        # a heartbeat that changes nothing is not logged (only refreshed in Redis)
        before = await r.xlen(reg.log_key)
        for _ in range(3):
            await reg.heartbeat(_info("b").model_copy(update={"state": WorkerState.DRAINING}))
        assert await r.xlen(reg.log_key) == before + 1  # the first: state set apart
    finally:
        await feed.stop()


async def test_a_silent_worker_leaves_the_view_after_its_ttl(r: aioredis.Redis) -> None:
    reg = WorkerRegistry(r, NS, ttl_s=0.6)
    await reg.register(_info("quiet"))
    await reg.register(_info("beating"))
    feed = RegistryFeed(r, NS)
    await feed.start()
    try:
        for _ in range(6):  # 'beating' keeps beating; 'quiet' crashed
            await asyncio.sleep(0.2)
            await reg.heartbeat(_info("beating"))
        assert [w.worker_id for w in feed.live()] == ["beating"]
    finally:
        await feed.stop()


async def test_the_feed_warms_again_after_redis_restarts() -> None:
    with redis_server() as srv:
        client = aioredis.Redis.from_url(srv.url)
        reg = WorkerRegistry(client, NS, ttl_s=60)
        await reg.register(_info("a"))
        feed = RegistryFeed(client, NS, RegistryFeedConfig(retry_s=0.05))
        await feed.start()
        try:
            srv.stop()
            await asyncio.sleep(0.3)
            srv.start()  # empty: the log lost the feed's position
            await reg.register(_info("b"))  # the workers register again (heartbeat)
            await eventually(lambda: feed.warms >= 2 and [w.worker_id for w in feed.live()]
                             == ["b"])
        finally:
            await feed.stop()
            await client.aclose()


async def test_the_gateway_directory_takes_its_view_from_the_feed(r: aioredis.Redis) -> None:
    """services/gateway/worker_directory.py with `registry_feed`: changes reach the gateway's
    view pushed (its registry polls every 60 s here, and is never polled while the feed is
    synced)."""
    from services.gateway.worker_directory import WorkerDirectory
    from tests.support.cluster import TEST_SECRET

    reg = WorkerRegistry(r, NS, ttl_s=60)
    await reg.register(_info("a"))
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, refresh_s=60,
                                feed=RegistryFeedConfig(max_staleness_s=0.5))
    polls = 0
    poll = directory.registry.live_workers

    async def counted() -> list[WorkerInfo]:
        nonlocal polls
        polls += 1
        return await poll()

    directory.registry.live_workers = counted  # type: ignore[method-assign]

    def ids() -> list[str]:
        return [w.worker_id for w in directory.workers]

    await directory.start()
    try:
        await eventually(lambda: ids() == ["a"])
        await reg.register(_info("b"))
        await eventually(lambda: ids() == ["a", "b"])
        await reg.heartbeat(_info("b", running=2))
        await eventually(lambda: directory.by_role(WorkerRole.BOTH)[1].load.num_running_reqs
                         == 2)
        await reg.deregister("a")
        await eventually(lambda: ids() == ["b"])
        assert polls == 0 and directory.feed is not None and directory.feed.synced()
    finally:
        await directory.stop()
    # no feed (the default): the directory polls
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, refresh_s=60)
    directory.registry.live_workers = counted  # type: ignore[method-assign]
    await directory.start()
    try:
        await eventually(lambda: ids() == ["b"] and polls == 1)
    finally:
        await directory.stop()


async def test_the_directory_polls_while_its_feed_is_out_of_sync() -> None:
    """Redis away: the feed goes out of sync and the directory polls (and keeps its last
    view); back, the feed warms again and the directory follows it."""
    from services.gateway.worker_directory import WorkerDirectory
    from tests.support.cluster import TEST_SECRET

    with redis_server() as srv:
        client = aioredis.Redis.from_url(srv.url)
        reg = WorkerRegistry(client, NS, ttl_s=60)
        await reg.register(_info("a"))
        directory = WorkerDirectory(client, NS, "m", TEST_SECRET, refresh_s=0.1, feed=(
            RegistryFeedConfig(max_staleness_s=0.3, retry_s=0.05)))
        polls = 0
        poll = directory.registry.live_workers

        async def counted() -> list[WorkerInfo]:
            nonlocal polls
            polls += 1
            return await poll()

        directory.registry.live_workers = counted  # type: ignore[method-assign]
        await directory.start()
        try:
            await eventually(lambda: [w.worker_id for w in directory.workers] == ["a"])
            assert polls == 0
            srv.stop()
            await eventually(lambda: polls >= 2)  # out of sync: polling (failing) again
            assert [w.worker_id for w in directory.workers] == ["a"]  # the last view kept
            srv.start()
            await reg.register(_info("b"))  # Redis came back empty; workers register again
            await eventually(lambda: [w.worker_id for w in directory.workers] == ["b"]
                             and directory.feed.synced())
        finally:
            await directory.stop()
            await client.aclose()
