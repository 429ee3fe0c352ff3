"""The decode-stream stall watchdog (services/gateway/pd_flow.py StallWatch): a read that waits
`stall_s` expires the surrounding timeout; time the consumer spends between reads never does."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.pd_flow import StallWatch


async def test_a_read_waiting_too_long_expires_the_timeout() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as timeout:
            with StallWatch(timeout, 0.2) as watch:
                watch.reading()
                await asyncio.sleep(5)  # the worker sends nothing


async def test_a_slow_consumer_and_steady_reads_never_do() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(None) as timeout:
        with StallWatch(timeout, 0.2) as watch:
            for _ in range(4):
                watch.reading()
                await asyncio.sleep(0.05)  # a chunk comes within the limit
                watch.idle()
                await asyncio.sleep(0.3)  # the client is slow: not the worker's stall
    assert loop.time() - start >= 1.4
    assert timeout.expired() is False


async def test_the_timer_is_gone_after_the_stream() -> None:
    async with asyncio.timeout(None) as timeout:
        with StallWatch(timeout, 0.1) as watch:
            watch.reading()
        await asyncio.sleep(0.3)  # the stream ended mid-read: nothing fires afterwards
    assert timeout.expired() is False
