"""The one place Redis clients are made: timeouts, a bounded connection pool, retries.

Every splitserve process gets its clients from :func:`redis_client` (asyncio) or
:func:`sync_redis_client`, configured by :class:`~router.redis_config.RedisClientConfig`
(``SPLITSERVE_REDIS_*``). redis-py's own defaults (5 s socket timeouts, 10 retries with
backoff, also on timeouts) would let one call to a silent Redis wait about a minute.

:class:`RedisHealth` lets a caller on the request path skip Redis while it is known to be
away, instead of paying a timeout on every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, MovedError, ReadOnlyError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from router.redis_config import RedisClientConfig

__all__ = ["RedisClientConfig", "RedisHealth", "RedisUnavailable", "UNAVAILABLE_ERRORS",
           "index_redis_client", "redis_client", "redis_env", "stop_task", "sync_redis_client"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a call gets while Redis (or a Redis Cluster's shard) is away or failing over: lost or
#: refused connections, timeouts, CLUSTERDOWN, a slot not served yet, TRYAGAIN, a write that
#: reached a primary just demoted, redirections that did not settle. Worth a retry later.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, ClusterError, RedisClusterException, TryAgainError,
    ReadOnlyError, MovedError)


def _kwargs(url: str, cfg: RedisClientConfig) -> dict:
    kw: dict = dict(socket_timeout=cfg.timeout_s, socket_connect_timeout=cfg.connect_timeout_s,
                    max_connections=cfg.max_connections, timeout=cfg.pool_timeout_s)
    if url.startswith("rediss://"):
        kw.update(ssl_cert_reqs="required", ssl_check_hostname=True,
                  ssl_ca_certs=cfg.tls_ca_file or None, ssl_certfile=cfg.tls_cert_file or None,
                  ssl_keyfile=cfg.tls_key_file or None)
    elif cfg.tls_files:
        raise ValueError("SPLITSERVE_REDIS_TLS_* files are set but the Redis URL is not "
                         "rediss://: a TLS Redis is reached by a rediss:// URL")
    return kw


def redis_client(url: str, config: RedisClientConfig | None = None, *,
                 decode_responses: bool = False) -> aioredis.Redis:
    """An asyncio client of ``url`` with ``config``'s timeouts and bounded pool (default:
    ``RedisClientConfig()``, i.e. the environment). Close it with ``await client.aclose()``."""
    cfg = config or RedisClientConfig()
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=decode_responses,
        retry=AsyncRetry(NoBackoff(), cfg.retries, supported_errors=(RedisConnectionError,)),
        **_kwargs(url, cfg))
    return aioredis.Redis.from_pool(pool)


def sync_redis_client(url: str, config: RedisClientConfig | None = None, *,
                      decode_responses: bool = False) -> redis.Redis:
    """The blocking-API counterpart of :func:`redis_client`."""
    cfg = config or RedisClientConfig()
    pool = redis.BlockingConnectionPool.from_url(
        url, decode_responses=decode_responses,
        retry=SyncRetry(NoBackoff(), cfg.retries, supported_errors=(RedisConnectionError,)),
        **_kwargs(url, cfg))
    return redis.Redis.from_pool(pool)


def index_redis_client(default: aioredis.Redis, config: RedisClientConfig | None = None
                       ) -> aioredis.Redis | RedisCluster:
    """The client of the prefix index: ``default`` (the cluster's Redis), or a new client of
    ``index_url`` (a Redis Cluster with ``index_cluster``) with the same settings; the caller
    closes a client it did not pass in."""
    cfg = config or RedisClientConfig()
    if not cfg.index_url:
        return default
    if not cfg.index_cluster:
        return redis_client(cfg.index_url, cfg)
    kw = _kwargs(cfg.index_url, cfg)
    kw.pop("timeout", None)  # a blocking-pool setting; the cluster client's pools do not block
    return RedisCluster.from_url(cfg.index_url, retry=AsyncRetry(
        NoBackoff(), cfg.retries, supported_errors=(RedisConnectionError,)), **kw)


def redis_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The SPLITSERVE_REDIS_* variables of ``environ`` (default: this process's), to pass on
    to processes started elsewhere (Ray actors on other nodes)."""
    import os

    env = os.environ if environ is None else environ
    prefix = RedisClientConfig.model_config.get("env_prefix", "")
    return {k: v for k, v in env.items() if k.upper().startswith(prefix)}


async def stop_task(task: "asyncio.Task[object]", timeout_s: float = 5.0) -> bool:
    """Cancel a background task that calls Redis and wait until it has ended, at most
    `timeout_s`; whether it ended. A cancellation that lands while a redis-py call completes
    can be swallowed (asyncio.wait_for in Python 3.11), and a polling loop then goes on
    forever: cancel again until it ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(0.5, left))
    if not task.cancelled() and task.exception() is not None:
        log.debug("stopped task %s had failed", task.get_name(), exc_info=task.exception())
    return True


class RedisUnavailable(RedisConnectionError):
    """Redis failed a call lately: not tried (see :class:`RedisHealth`)."""


class RedisHealth:
    """Whether Redis answered lately, for callers that must not wait on a silent one.

    A failed call makes :attr:`available` false for ``pause_s``; a successful one (e.g. the
    gateway's registry refresh, which keeps probing) makes it true again at once. Calls made
    through :meth:`call` are bounded by ``deadline_s`` in all (pool wait, connect, reply).
    """

    def __init__(self, pause_s: float, deadline_s: float) -> None:
        self.pause_s = pause_s
        self.deadline_s = deadline_s
        self.failures = 0
        self._down_until = 0.0
        self._down = False

    @classmethod
    def from_config(cls, cfg: RedisClientConfig) -> "RedisHealth":
        """Pause as configured; the deadline of a call: connect plus one reply."""
        return cls(cfg.outage_pause_s, cfg.connect_timeout_s + cfg.timeout_s)

    @property
    def available(self) -> bool:
        """False while in the pause after a failure."""
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException | None = None) -> None:
        """Record a failed call: pause."""
        self.failures += 1
        self._down_until = time.monotonic() + self.pause_s
        if not self._down:
            self._down = True
            log.warning("Redis unavailable (%s): request-path lookups skip it for %.1fs at a "
                        "time until it answers again", exc or "call failed", self.pause_s)

    def succeeded(self) -> None:
        """Record a successful call: end any pause."""
        self._down_until = 0.0
        if self._down:
            self._down = False
            log.warning("Redis answers again")

    async def call(self, fn: Callable[[], Awaitable[T]], *, probe: bool = False) -> T:
        """``await fn()`` within ``deadline_s``, recording the outcome. Raises
        :class:`RedisUnavailable` without calling while paused, unless ``probe``."""
        if not probe and not self.available:
            raise RedisUnavailable("Redis failed a call lately; not tried")
        try:
            async with asyncio.timeout(self.deadline_s):
                result = await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
            raise
        self.succeeded()
        return result
