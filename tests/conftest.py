"""Fixtures shared by every suite."""

from __future__ import annotations

from typing import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.support.redis import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    """A private Redis for the test module (loopback, free port, stopped by PID)."""
    with redis_server() as srv:
        yield srv


@pytest.fixture
async def r(redis_srv: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the module's Redis, on an empty database."""
    client = aioredis.Redis.from_url(redis_srv.url)
    await client.flushdb()
    yield client
    await client.aclose()
