"""A private, throw-away Redis for a test (loopback, no persistence, stopped by PID)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

from services.controller.redis_server import RedisServer

__all__ = ["RedisServer", "redis_server"]


@contextlib.contextmanager
def redis_server(port: int = 0) -> Iterator[RedisServer]:
    """Start a redis-server on `port` (0: a free one), yield it, stop it."""
    with tempfile.TemporaryDirectory(prefix="splitserve-redis-") as d:
        server = RedisServer(Path(d), port=port)
        server.start()
        try:
            yield server
        finally:
            server.stop()
