"""Redis clients from router/redis_client.py against a real redis-server that goes silent
(SIGSTOP) and comes back (SIGCONT): calls fail within their bound instead of hanging, the
gateway's real route path (WorkerDirectory + RouteStage + PrefixIndex) degrades to load-only
routing on its last registry snapshot, and everything works again after SIGCONT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Iterator

import pytest
from redis.exceptions import RedisError

from router.block_hash import BlockHasher
from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.redis_client import (RedisClientConfig, RedisHealth, RedisUnavailable,
                                 redis_client, redis_env, stop_task, sync_redis_client)
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.redis import RedisServer, redis_server
from tests.support.cluster import TEST_SECRET

CFG = RedisClientConfig()  # the defaults: 0.5 s connect, 0.5 s reply, 64 connections
# A call to a silent Redis may take: a free connection (pool), a connect with its handshake
# and one reply. Far below redis-py's own defaults (about a minute with its 10 retries).
BOUND_S = CFG.pool_timeout_s + CFG.connect_timeout_s + CFG.timeout_s + 0.5


@contextlib.contextmanager
def silenced(server: RedisServer) -> Iterator[None]:
    """SIGSTOP the server for the block (it accepts TCP connections, answers nothing)."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test alone (it gets stopped)."""
    with redis_server() as srv:
        yield srv


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_REDIS_TIMEOUT_S", "0.3")
    monkeypatch.setenv("SPLITSERVE_REDIS_MAX_CONNECTIONS", "7")
    client = redis_client("redis://127.0.0.1:1/0")
    pool = client.connection_pool
    assert pool.max_connections == 7 and pool.timeout == CFG.pool_timeout_s
    assert pool.connection_kwargs["socket_timeout"] == 0.3
    assert pool.connection_kwargs["socket_connect_timeout"] == CFG.connect_timeout_s
    sync = sync_redis_client("redis://127.0.0.1:1/0", RedisClientConfig(max_connections=3))
    assert sync.connection_pool.max_connections == 3
    tools = RedisClientConfig().for_tools()
    assert tools.timeout_s == tools.connect_timeout_s == 5.0 and tools.max_connections == 7
    env = redis_env({"SPLITSERVE_REDIS_TIMEOUT_S": "0.3", "SPLITSERVE_LOG_FORMAT": "json"})
    assert env == {"SPLITSERVE_REDIS_TIMEOUT_S": "0.3"}


async def test_a_silent_redis_fails_calls_within_the_bound_and_recovers(
        own_redis: RedisServer) -> None:
    client = redis_client(own_redis.url)
    try:
        await client.set("k", "v")
        with silenced(own_redis):
            # more calls at once than the pool holds: each fails, none waits for long
            n = CFG.max_connections + 16

            async def one() -> tuple[float, BaseException | None]:
                start = time.monotonic()
                try:
                    await client.get("k")
                    return time.monotonic() - start, None
                except RedisError as exc:
                    return time.monotonic() - start, exc

            results = await asyncio.gather(*[one() for _ in range(n)])
            assert all(exc is not None for _, exc in results)
            slowest = max(t for t, _ in results)
            assert slowest < BOUND_S, f"a call to a silent Redis took {slowest:.2f}s"
        # no restart of the client needed: the next call works
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


def test_sync_client_fails_fast_too(own_redis: RedisServer) -> None:
    client = sync_redis_client(own_redis.url)
    try:
        assert client.ping()
        with silenced(own_redis):
            start = time.monotonic()
            with pytest.raises(RedisError):
                client.ping()
            assert time.monotonic() - start < BOUND_S
        assert client.ping()
    finally:
        client.close()


async def test_health_pauses_after_a_failure_and_a_probe_ends_the_pause(
        own_redis: RedisServer) -> None:
    health = RedisHealth(pause_s=30.0, deadline_s=1.0)
    client = redis_client(own_redis.url)
    try:
        assert await health.call(client.ping) and health.available
        with silenced(own_redis):
            with pytest.raises((RedisError, TimeoutError)):
                await health.call(client.ping)
            assert not health.available
            start = time.monotonic()
            with pytest.raises(RedisUnavailable):  # not tried at all while paused
                await health.call(client.ping)
            assert time.monotonic() - start < 0.1
        assert await health.call(client.ping, probe=True) and health.available
    finally:
        await client.aclose()


def _worker(wid: str) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=WorkerRole.BOTH, address=f"127.0.0.1:{1 + len(wid)}",
                      model="m", block_size=16, hash_algo="sha256", hash_seed="0")


async def test_gateway_routes_on_load_only_while_redis_is_silent(
        own_redis: RedisServer) -> None:
    """The gateway's route path with its real parts: registry snapshot, prefix index, kv
    policy. Redis stopped: every route returns within the bound (after the first failure at
    once), on load alone, to the workers of the last snapshot. Redis back: routing by prefix
    resumes by itself; a worker's heartbeat also recovers without help."""
    ns = "silent"
    client = redis_client(own_redis.url)
    registry = WorkerRegistry(client, ns, ttl_s=120)
    for wid in ("w-a", "w-b"):
        await registry.register(_worker(wid))
    index = PrefixIndex(client, ns)
    prompt = list(range(1, 97))  # 6 blocks of 16
    await index.add_blocks("w-b", BlockHasher(16, "sha256", "0").block_hashes(prompt))
    health = RedisHealth.from_config(CFG)
    directory = WorkerDirectory(client, ns, "m", TEST_SECRET, refresh_s=0.2, health=health)
    metrics = GatewayMetrics()
    flow = RouteStage(directory, make_policy("kv"), index, metrics)
    beat_client = redis_client(own_redis.url)  # a worker's own client
    try:
        await directory.refresh()
        await directory.start()
        before = await flow.route(prompt)
        assert (before.decode.worker_id, before.predicted_cached_blocks) == ("w-b", 6)
        # audited as the engine can hit it: 96 tokens, the last one is always computed
        assert before.predicted_cached_tokens == 80
        with silenced(own_redis):
            durations = []
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                start = time.monotonic()
                decision = await flow.route(prompt)
                durations.append(time.monotonic() - start)
                assert decision.predicted_cached_blocks == 0  # load only
                assert decision.predicted_cached_tokens is None  # nothing to audit
                assert decision.decode.worker_id in ("w-a", "w-b")  # the last snapshot
                await asyncio.sleep(0.05)
            assert max(durations) < BOUND_S, f"slowest route {max(durations):.2f}s"
            # after the first failure, requests stop waiting on Redis at all
            assert sum(d > 0.1 for d in durations) <= 2, durations
            assert [w.worker_id for w in directory.workers] == ["w-a", "w-b"]
            assert not health.available
            start = time.monotonic()
            with pytest.raises((RedisError, TimeoutError)):
                await WorkerRegistry(beat_client, ns).heartbeat(_worker("w-a"))
            assert time.monotonic() - start < BOUND_S
        errors = metrics.index_errors._value.get()  # type: ignore[attr-defined]
        assert errors >= len(durations)
        # Redis answers again: the next registry refresh ends the pause, routing by prefix
        # resumes, the worker's next heartbeat goes through
        deadline = time.monotonic() + 5.0
        while not health.available and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert health.available
        after = await flow.route(prompt)
        assert (after.decode.worker_id, after.predicted_cached_blocks) == ("w-b", 6)
        assert await WorkerRegistry(beat_client, ns).heartbeat(_worker("w-a")) is True
    finally:
        await directory.stop()
        await client.aclose()
        await beat_client.aclose()


def test_stop_task_ends_a_loop_that_swallowed_its_cancellation() -> None:
    """A polling loop whose Redis call ate the cancellation (the bench's queue sampler hung
    a CI run so) is cancelled again until it ends; one that never ends is given up on."""
    async def swallows_once() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # as a redis-py call completing at the moment of the cancel
        while True:
            await asyncio.sleep(0.05)

    released = asyncio.Event()

    async def never_ends() -> None:  # until the test lets it
        while not released.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    async def main() -> tuple[bool, bool, bool]:
        a = asyncio.create_task(swallows_once())
        b = asyncio.create_task(never_ends())
        await asyncio.sleep(0.01)
        ended_a = await stop_task(a, timeout_s=3)
        ended_b = await stop_task(b, timeout_s=0.3)
        done_b = b.done()
        released.set()
        b.cancel()
        await b
        return ended_a and a.cancelled(), ended_b, done_b

    assert asyncio.run(main()) == (True, False, False)
