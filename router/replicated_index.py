"""The prefix index as a gateway reads it with a local replica: no Redis round trip per lookup.

:class:`ReplicatedPrefixIndex` is a :class:`~router.prefix_index.PrefixIndex` whose lookups
come from its :class:`~router.index_replica.IndexReplica` while every partition of the replica
is synced (docs/routing.md, "The gateway's replica"), and from Redis otherwise (warming up,
a failover, Redis away: the Redis lookup, which may fail, and the caller routes on load).
Writes and purges are the index's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from router.index_replica import IndexReplica
from router.prefix_depths import PrefixDepths
from router.prefix_index import PrefixIndex
from router.redis_client import UNAVAILABLE_ERRORS, index_redis_client, stop_task
from router.replica_config import IndexReplicaConfig

logger = logging.getLogger(__name__)

__all__ = ["ReplicatedPrefixIndex", "ReplicatedReads", "open_prefix_index"]


@dataclass
class ReplicatedReads:
    """Where lookups were answered from."""

    replica: int = 0
    redis: int = 0


class ReplicatedPrefixIndex(PrefixIndex):
    """A prefix index read through a local replica; :meth:`start` before use."""

    def __init__(self, redis: Any, namespace: str, *, replica: IndexReplicaConfig | None = None,
                 **kwargs: Any) -> None:
        """``redis``, ``namespace`` and ``kwargs`` as :class:`PrefixIndex`; ``replica``: the
        replica's settings."""
        super().__init__(redis, namespace, **kwargs)
        self.replica = IndexReplica(self, replica)
        self.reads = ReplicatedReads()
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Warm the replica from Redis and follow the change logs; with Redis away, keep
        trying in the background (lookups ask Redis meanwhile)."""
        try:
            await self.replica.start()
        except UNAVAILABLE_ERRORS as exc:
            logger.warning("index replica: cannot warm up (%s); retrying in the background", exc)
            self._starting = asyncio.create_task(self._start_later(), name="index-replica-warm")

    async def _start_later(self) -> None:
        delay = self.replica.config.retry_s
        while True:
            await asyncio.sleep(delay)
            try:
                await self.replica.start()
                logger.warning("index replica: warmed up")
                return
            except UNAVAILABLE_ERRORS:
                delay = min(delay * 2, 5.0)

    async def longest_prefixes(self, block_hashes: Sequence[int] | Iterable[int],
                               worker_ids: Sequence[str] | None = None) -> dict[str, int]:
        """As :meth:`PrefixIndex.longest_prefixes`, but only workers holding the prompt's
        first block are listed when the replica answers (the others hold none of it)."""
        if worker_ids is not None and self.replica.synced():  # None: liveness from Redis
            self.reads.replica += 1
            return self.replica.longest_prefixes(
                block_hashes, None if worker_ids is None else set(worker_ids))
        self.reads.redis += 1
        return await super().longest_prefixes(list(block_hashes), worker_ids)

    def local_prefixes(self, block_hashes: Sequence[int] | Iterable[int],
                       eligible: Container[str]) -> PrefixDepths | None:
        """The replica's answer to :meth:`longest_prefixes` for the workers in ``eligible``
        (any container: only membership is asked), with no await; None while the replica is
        not synced (then ask :meth:`longest_prefixes`, i.e. Redis)."""
        if not self.replica.synced():
            return None
        self.reads.replica += 1
        return self.replica.longest_prefixes(block_hashes, eligible)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Stop the replica and close the index's per-node connections."""
        if self._starting is not None:
            await stop_task(self._starting)
        await self.replica.stop()
        await super().aclose()


async def open_prefix_index(redis: Any, namespace: str,
                            replica: IndexReplicaConfig | None = None) -> PrefixIndex:
    """A gateway's prefix index, on the index's own Redis (Cluster) when one is configured
    (``SPLITSERVE_REDIS_INDEX_URL``), else on ``redis``; with a started local replica when
    ``replica`` is given. ``aclose()`` it when done."""
    client = index_redis_client(redis)
    own = client is not redis
    kw: dict[str, Any] = {"close_client": own, "registry": redis if own else None}
    if replica is None:
        return PrefixIndex(client, namespace, **kw)
    index = ReplicatedPrefixIndex(client, namespace, replica=replica, **kw)
    await index.start()
    return index
