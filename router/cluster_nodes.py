"""Plain per-node connections to a Redis Cluster's primaries, for many single-key commands at once.

redis-py's cluster pipeline spends much client CPU per command (slot lookups, per-command
bookkeeping, retries), and even its plain pipeline encodes each argument in Python (about
6 us per command; hiredis packs one in 1 us). :class:`NodeClients` sends each node's share of
a batch as one burst of hiredis-packed commands on one pooled connection of that node, all
nodes in parallel, routed by the cluster client's slot map, and reads the replies in order.
On an error (a MOVED after a failover, a node away) the cluster pipeline runs the batch
instead, which follows redirections and refreshes the slot map. On a single Redis the batch
is one burst on that client's pool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # redis-py's own dependency there
    from async_timeout import timeout as _deadline

logger = logging.getLogger(__name__)

__all__ = ["NodeClients"]

_KEEP_KWARGS = ("host", "port", "db", "path", "username", "password", "socket_timeout",
                "socket_connect_timeout", "decode_responses", "encoding", "ssl", "retry",
                "health_check_interval")


def _kept(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in _KEEP_KWARGS or k.startswith("ssl_")}


class NodeClients:
    """One plain client per primary of a cluster (or the single Redis itself).

    ``decode_responses`` (None: as the given client) and ``dedicated`` (a single Redis: a
    client of its own rather than the given one, e.g. for blocking reads) shape the clients.
    """

    def __init__(self, redis: aioredis.Redis | RedisCluster, *,
                 decode_responses: bool | None = None, dedicated: bool = False) -> None:
        self.redis = redis
        self.clustered = isinstance(redis, RedisCluster)
        self._decode = decode_responses
        self._dedicated = dedicated and not self.clustered
        self._clients: dict[str, aioredis.Redis] = {}

    async def initialize(self) -> None:
        """Read the cluster's slot map if not read yet (nothing on a single Redis)."""
        if self.clustered:
            await self.redis.initialize()  # type: ignore[union-attr]

    def node_name(self, key: str | bytes) -> str:
        """``host:port`` of the primary serving ``key`` now (the single Redis: ``""``)."""
        if not self.clustered:
            return ""
        return self.redis.get_node_from_key(key).name  # type: ignore[union-attr]

    def client(self, name: str) -> aioredis.Redis:
        """The plain client of node ``name`` (made on first use)."""
        if not self.clustered and not self._dedicated:
            return self.redis  # type: ignore[return-value]
        c = self._clients.get(name)
        if c is None:
            if self.clustered:
                host, port = name.rsplit(":", 1)
                kw = _kept(self.redis.get_connection_kwargs())
                kw.update(host=host, port=int(port))
                if self._decode is not None:
                    kw["decode_responses"] = self._decode
                c = aioredis.Redis(**kw)
            else:
                pool = self.redis.connection_pool  # type: ignore[union-attr]
                kw = _kept(pool.connection_kwargs)
                if self._decode is not None:
                    kw["decode_responses"] = self._decode
                c = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
                    connection_class=pool.connection_class, **kw))
            self._clients[name] = c
        return c

    def client_for(self, key: str | bytes) -> aioredis.Redis:
        """The plain client of the primary serving ``key``."""
        return self.client(self.node_name(key))

    async def refresh(self) -> None:
        """Re-read the cluster's slot map (after a failover) and drop every plain client."""
        await self.aclose()
        await self.refresh_slots()

    async def refresh_slots(self) -> None:
        """Re-read the cluster's slot map (nothing on a single Redis)."""
        if self.clustered:
            await self.redis.nodes_manager.initialize()  # type: ignore[union-attr]

    async def forget(self, name: str) -> None:
        """Close node ``name``'s plain client (the next use makes a new one)."""
        c = self._clients.pop(name, None)
        if c is not None:
            await c.aclose()

    async def run(self, cmds: list[tuple], writes: bool = False,
                  route: Sequence[str] | None = None) -> list[Any]:
        """Run single-key commands (key at position 1) in one round trip per node, in parallel.

        Results come back in order. For ``writes``, a lost connection is raised rather than
        retried through the cluster pipeline (the caller decides: after a primary's crash its
        promoted replica may lack acknowledged writes). ``route``: for each command, a key of
        its hash slot to route it by (commands sharing one are routed once; default: their
        own keys).
        """
        rc = self.redis
        if not cmds:
            return []
        if not self.clustered:
            out = await burst(self.client(""), cmds)
            for v in out:
                if isinstance(v, ResponseError):
                    raise v
            return out
        try:
            groups: dict[str, list[int]] = {}
            if route is None:
                for i, c in enumerate(cmds):
                    groups.setdefault(self.node_name(c[1]), []).append(i)
            else:
                names: dict[str, str] = {}
                for i, k in enumerate(route):
                    name = names.get(k)
                    if name is None:
                        name = names[k] = self.node_name(k)
                    groups.setdefault(name, []).append(i)
            out = [None] * len(cmds)

            async def run_on(name: str, idxs: list[int]) -> None:
                for i, v in zip(idxs, await burst(self.client(name), [cmds[i] for i in idxs])):
                    if isinstance(v, ResponseError):
                        raise v
                    out[i] = v

            if len(groups) == 1:
                await run_on(*next(iter(groups.items())))
            else:
                await asyncio.gather(*[run_on(n, ix) for n, ix in groups.items()])
            return out
        except Exception as exc:
            logger.debug("per-node pipeline failed; using the cluster pipeline", exc_info=True)
            await self.aclose()
            if writes and isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
                raise
        async with rc.pipeline(transaction=False) as pipe:
            for c in cmds:
                pipe.execute_command(*c)
            return await pipe.execute()

    async def aclose(self) -> None:
        """Close the plain clients (the cluster client is the caller's; so is a single Redis
        client unless ``dedicated``)."""
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.aclose()


async def burst(client: aioredis.Redis, cmds: list[tuple]) -> list[Any]:
    """Send ``cmds`` on one pooled connection of ``client`` in one write (packed by hiredis),
    then read their replies in order, under one deadline of the connection's socket timeout
    for them all (one per reply cost more client CPU than the rest of a write); an error
    reply comes back as its ResponseError. A connection that fails before any reply (a
    pooled one the server closed when it restarted) is replaced once; a failure after that
    drops the connection and raises."""
    if not cmds:
        return []
    packed = b"".join([hiredis.pack_command(c) for c in cmds])
    pool = client.connection_pool
    for attempt in (0, 1):
        conn = await pool.get_connection()
        out: list[Any] = []
        try:
            await conn.send_packed_command(packed, check_health=False)
            try:
                async with _deadline(conn.socket_timeout):
                    for _ in cmds:
                        try:
                            out.append(await conn.read_response(timeout=math.inf))
                        except ResponseError as exc:
                            out.append(exc)
            except asyncio.TimeoutError as exc:  # (an OSError on 3.11: not retried below)
                where = getattr(conn, "path", "") or f"{conn.host}:{conn.port}"
                raise RedisTimeoutError(f"Timeout reading from {where}") from exc
            return out
        except (RedisConnectionError, OSError):
            await conn.disconnect()
            if attempt or out:
                raise
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
    raise AssertionError("unreachable")
