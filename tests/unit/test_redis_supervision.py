"""`up`'s private Redis under supervision (services/controller/redis_server.py), on real
processes: a SIGKILLed redis-server is started again on its port, and the cluster's state comes
back by itself: the registry from the workers' heartbeats, the prefix index from a real
IndexUpdater's mirror of what vLLM's own KV-event publisher announced, and the gateway's real
route path (WorkerDirectory + RouteStage + kv policy) routes by prefix again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from router.block_hash import BlockHasher
from router.index_updater import IndexUpdater, IndexUpdaterConfig
from router.kv_events import SubscriberConfig
from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.redis_client import redis_client
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.controller.redis_server import RedisServer, RedisSupervisor
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory

import vllm.distributed.kv_events as vkv  # noqa: E402  (the engine's real publisher)
from tests.support.cluster import TEST_SECRET

NS = "sup"


@contextlib.contextmanager
def supervised(tmp_path: Path, interval_s: float = 0.1):
    server = RedisServer(tmp_path)
    server.start()
    sup = RedisSupervisor(server, interval_s=interval_s)
    sup.start()
    try:
        yield server, sup
    finally:
        sup.stop()
        server.stop()


def test_a_private_redis_with_a_password_refuses_anyone_without_it(tmp_path: Path) -> None:
    import psutil
    import redis as redis_py

    from services.cluster_secret import ClusterSecret

    secret = ClusterSecret.generate()
    password = secret.redis_password
    assert password != secret.grpc_token
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        assert server.url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(host="127.0.0.1", port=server.port, socket_timeout=5).ping()
        assert redis_py.Redis.from_url(server.url, socket_timeout=5).ping()
        assert (tmp_path / "redis.conf").stat().st_mode & 0o777 == 0o600
        assert server.proc is not None
        assert password not in " ".join(psutil.Process(server.proc.pid).cmdline())
        # restarted by its supervisor: the same password
        sup = RedisSupervisor(server, interval_s=0.1)
        sup.start()
        try:
            server.proc.kill()
            server.proc.wait()
            deadline = time.monotonic() + 15
            while sup.restarts == 0:
                assert time.monotonic() < deadline, "not restarted"
                time.sleep(0.1)
            with pytest.raises(redis_py.AuthenticationError):
                redis_py.Redis(host="127.0.0.1", port=server.port, socket_timeout=5).ping()
            assert redis_py.Redis.from_url(server.url, socket_timeout=5).ping()
        finally:
            sup.stop()
    finally:
        server.stop()


async def _true(value: bool) -> bool:
    return value


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


def kill(server: RedisServer) -> int:
    assert server.proc is not None
    pid = server.proc.pid
    os.kill(pid, signal.SIGKILL)
    return pid


async def test_a_killed_private_redis_is_started_again_on_its_port(tmp_path: Path) -> None:
    with supervised(tmp_path) as (server, sup):
        url = server.url
        client = redis_client(url)
        try:
            await client.set("k", "v")
            old = kill(server)
            # the same client, same URL: its broken connection is replaced
            await eventually(lambda: client.ping())
            await eventually(lambda: _true(sup.restarts == 1))
            assert server.proc is not None and server.proc.pid != old
            assert server.url == url and await client.get("k") is None  # empty: no persistence
            sup.stop()  # stopped on purpose (up is stopping): a dead Redis stays dead
            kill(server)
            await asyncio.sleep(0.5)
            assert not server.running and sup.restarts == 1
        finally:
            await client.aclose()


@pytest.fixture
async def publisher(tmp_path: Path) -> AsyncIterator[vkv.ZmqEventPublisher]:
    pub = vkv.ZmqEventPublisher(data_parallel_rank=0, endpoint=f"ipc://{tmp_path}/kv.sock",
                                replay_endpoint=None, buffer_steps=100, topic="kv")
    yield pub
    pub.shutdown()


def _worker(wid: str) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=WorkerRole.BOTH, address=f"127.0.0.1:{1 + len(wid)}",
                      model="m", block_size=16, hash_algo="sha256", hash_seed="0")


async def test_registry_index_and_prefix_routing_come_back_after_redis_is_killed(
        tmp_path: Path, publisher: vkv.ZmqEventPublisher) -> None:
    prompt = list(range(1, 97))  # 6 blocks of 16
    hashes = BlockHasher(16, "sha256", "0").block_hashes(prompt)
    with supervised(tmp_path) as (server, sup):
        worker_client, gateway_client = redis_client(server.url), redis_client(server.url)
        registry = WorkerRegistry(worker_client, NS, ttl_s=5)

        async def heartbeats() -> None:  # what every worker runs (services/worker/process.py)
            while True:
                for wid in ("w-a", "w-b"):
                    with contextlib.suppress(Exception):
                        await registry.heartbeat(_worker(wid))
                await asyncio.sleep(0.5)

        beats = asyncio.create_task(heartbeats())
        updater = IndexUpdater(PrefixIndex(worker_client, NS), IndexUpdaterConfig(
            worker_id="w-b", subscriber=SubscriberConfig(endpoint=f"ipc://{tmp_path}/kv.sock",
                                                         topic="kv"), audit_interval_s=0.5))
        updater.start()
        directory = WorkerDirectory(gateway_client, NS, "m", TEST_SECRET, refresh_s=0.2)
        flow = RouteStage(directory, make_policy("kv"), PrefixIndex(gateway_client, NS),
                        GatewayMetrics())
        try:
            await asyncio.wait_for(updater.ready.wait(), 10)
            await asyncio.sleep(1.0)  # PUB/SUB slow joiner
            publisher.publish(vkv.KVEventBatch(ts=0.0, events=[vkv.BlockStored(
                block_hashes=hashes, parent_block_hash=None, token_ids=prompt, block_size=16,
                lora_id=None, medium="GPU", lora_name=None)]))
            await directory.start()

            async def routes_by_prefix() -> bool:
                d = await flow.route(prompt)
                return (d.decode.worker_id, d.predicted_cached_blocks) == ("w-b", 6)

            await eventually(routes_by_prefix)
            beats.cancel()  # hold the heartbeats back to see the gateway in the gap
            kill(server)
            await eventually(lambda: gateway_client.ping())
            await eventually(lambda: _true(sup.restarts == 1))
            await directory.refresh()
            assert await registry.live_workers() == []  # the new Redis is empty
            # but the gateway does not take a registry that lost every worker at once: a
            # request in the gap goes to the workers it knew, no 503 (worker_directory.py)
            assert [w.worker_id for w in directory.workers] == ["w-a", "w-b"]
            route = await asyncio.wait_for(flow.route(prompt), 10)
            assert route.decode.worker_id in ("w-a", "w-b")
            beats = asyncio.create_task(heartbeats())
            # now Redis holds both workers and w-b's blocks again
            await eventually(routes_by_prefix)
            assert [w.worker_id for w in await registry.live_workers()] == ["w-a", "w-b"]
            assert await PrefixIndex(gateway_client, NS).worker_block_count("w-b") == 6
            assert updater.stats.rebuilds >= 1
        finally:
            beats.cancel()
            await updater.stop()
            await directory.stop()
            await worker_client.aclose()
            await gateway_client.aclose()


async def test_a_lagging_registry_is_worth_waiting_for(tmp_path: Path, monkeypatch) -> None:
    """No serving worker in the registry, but a moment ago there was one and the controller
    still counts a serving decode worker (liveness keys that expired while Redis was stopped):
    the gateway waits for the next heartbeat instead of failing. With the controller counting
    and wanting none, it does not. (The directory takes the empty registry here at once; by
    default it holds the last snapshot a while first: test_serving_pools.py.)"""
    from services.controller.pool_sizes import PoolObservation, PoolSizes
    from services.gateway import worker_directory

    monkeypatch.setattr(worker_directory, "EMPTIED_GRACE_S", 0.0)

    with supervised(tmp_path) as (server, _):
        client = redis_client(server.url)
        try:
            sizes = PoolSizes(client, NS)
            await sizes.set_desired({"both": 1}, by="test")
            await sizes.publish_observed({"both": PoolObservation(serving=1)})
            registry = WorkerRegistry(client, NS, ttl_s=5)
            directory = WorkerDirectory(client, NS, "m", TEST_SECRET)
            assert not await directory.pools_healing()  # never saw a serving worker
            await registry.register(_worker("w-a"))
            await directory.refresh()
            await registry.deregister("w-a")
            await directory.refresh()
            assert directory.workers == [] and await directory.pools_healing()
            # the controller counts none, and wants none (scaled to 0): nothing is coming
            await sizes.set_desired({"both": 0}, by="test")
            await sizes.publish_observed({"both": PoolObservation(serving=0)})
            assert not await directory.pools_healing()
            assert not await directory.pools_healing(lost_grace_s=0.0)
        finally:
            await client.aclose()
