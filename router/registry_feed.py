"""A gateway's view of the live workers, pushed from Redis: the registry's change log followed
(router/registry.py, ``{ns}:workers:log``) instead of every gateway reading every worker's
entry every half second.

- **Warm-up.** The position of the log's end, then one snapshot of the live workers (and the
  remaining TTL of their liveness keys), then the log from that position: a change made
  during the snapshot is in both, and applying it again is harmless (each entry carries the
  state it sets).
- **Following.** One blocking ``XREAD`` on a connection of the feed's own; registrations,
  heartbeats (load and state when they changed, and at least every ``ttl / 3``), state changes
  and deregistrations are applied in order.
- **Liveness.** A worker counts until its last logged TTL runs out from when the entry was
  read here (a crashed worker leaves the view within its TTL, as its liveness key expires);
  a deregistration removes it at once.
- **Gaps.** After an error, the log is resumed only if it still holds the entry last applied
  (else, after a failover or a trim, the feed warms again); after a full read, only if the
  log's first entry is not past it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

from router.cluster_nodes import NodeClients, burst
from router.redis_client import stop_task
from router.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerState
from router.replica_config import RegistryFeedConfig

logger = logging.getLogger(__name__)

__all__ = ["RegistryFeed", "RegistryFeedConfig"]

_NO_ENTRY = b"0-0"


def _entry_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


class RegistryFeed:
    """The live workers of a cluster, kept up to date from the registry's change log."""

    def __init__(self, redis: Any, namespace: str, config: RegistryFeedConfig | None = None
                 ) -> None:
        """Follow the registry of ``namespace`` on ``redis`` (a single Redis client)."""
        self.config = cfg = config or RegistryFeedConfig()
        self.registry = WorkerRegistry(redis, namespace)
        self.nodes = NodeClients(redis, decode_responses=False, dedicated=True)
        self._workers: dict[str, WorkerInfo] = {}
        self._expires: dict[str, float] = {}
        self._last_id = _NO_ENTRY
        self._synced_at = -math.inf
        self._task: asyncio.Task[None] | None = None
        #: bumped on every change of the view (a consumer re-reads it when it moved)
        self.version = 0
        self.entries = 0
        self.warms = 0
        timeout = redis.get_connection_kwargs().get("socket_timeout")
        self._block_ms = (max(1, min(cfg.block_ms, int(timeout * 1000 / 2))) if timeout
                          else cfg.block_ms)

    async def start(self) -> None:
        """Warm up from a snapshot, then follow the log."""
        await self._warm()
        self._task = asyncio.create_task(self._follow(), name="registry-feed")

    async def stop(self) -> None:
        """Stop following; close the feed's connection."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        await self.nodes.aclose()

    def synced(self, now: float | None = None) -> bool:
        """Whether the log was read to its end by a read sent within ``max_staleness_s``."""
        now = time.monotonic() if now is None else now
        return self._synced_at >= now - self.config.max_staleness_s

    def live(self, now: float | None = None) -> list[WorkerInfo]:
        """The live workers, by id."""
        now = time.monotonic() if now is None else now
        exp = self._expires
        return [w for i, w in sorted(self._workers.items()) if exp.get(i, 0.0) > now]

    # -- warm-up and following ---------------------------------------------------------------

    async def _warm(self) -> None:
        client = self.nodes.client("")
        log = self.registry.log_key
        last = await client.xrevrange(log, count=1)
        end = last[0][0] if last else _NO_ENTRY
        workers = await self.registry.live_workers()
        async with client.pipeline(transaction=False) as pipe:
            for w in workers:
                pipe.pttl(f"{self.registry.ns}:worker:{w.worker_id}:alive")
            ttls = await pipe.execute()
        now = time.monotonic()
        self._workers = {w.worker_id: w for w in workers}
        self._expires = {w.worker_id: now + (t / 1000 if t >= 0 else 1e9)
                         for w, t in zip(workers, ttls) if t != -2}
        self._last_id = end
        self._synced_at = now
        self.version += 1
        self.warms += 1

    async def _follow(self) -> None:
        cfg = self.config
        log = self.registry.log_key
        broken = False
        while True:
            try:
                client = self.nodes.client("")
                if broken:
                    if self._last_id != _NO_ENTRY and not await client.xrange(
                            log, self._last_id, self._last_id):
                        await self._warm()
                    broken = False
                sent = time.monotonic()
                resp = (await burst(client, [("XREAD", "COUNT", cfg.read_count, "BLOCK",
                                              self._block_ms, "STREAMS", log,
                                              self._last_id)]))[0]
                if isinstance(resp, Exception):
                    raise resp
                pairs = resp.items() if isinstance(resp, dict) else (resp or [])
                entries = next((e for _, e in pairs), [])
                if len(entries) >= cfg.read_count:
                    first = await client.xrange(log, count=1)
                    if first and _entry_id(first[0][0]) > _entry_id(self._last_id):
                        logger.warning("registry feed: the log was trimmed past its position; "
                                       "warming again")
                        await self._warm()
                        continue
                if entries:
                    self._apply(entries, time.monotonic())
                if len(entries) < cfg.read_count:
                    self._synced_at = sent
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not broken:
                    logger.warning("registry feed: reading the log failed (%s: %s); resuming",
                                   type(exc).__name__, exc)
                broken = True
                await self.nodes.forget("")
                await asyncio.sleep(cfg.retry_s)

    def _apply(self, entries: list, now: float) -> None:
        workers, expires = self._workers, self._expires
        for eid, flat in entries:
            f = {flat[k]: flat[k + 1] for k in range(0, len(flat), 2)}
            op, w = f[b"o"], f[b"w"].decode()
            until = now + int(f[b"t"]) / 1000
            if op == b"r":
                workers[w] = WorkerInfo.from_redis(json.loads(f[b"i"]))
                expires[w] = until
            elif op == b"d":
                workers.pop(w, None)
                expires.pop(w, None)
            elif (info := workers.get(w)) is not None:  # h, s: of a worker known here
                update: dict[str, Any] = {"state": WorkerState(f[b"s"].decode())}
                if op == b"h":
                    update["load"] = WorkerLoad.model_validate_json(f[b"l"])
                    expires[w] = until
                workers[w] = info.model_copy(update=update)
        self._last_id = entries[-1][0]
        self.entries += len(entries)
        self.version += 1
