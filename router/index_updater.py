"""Keeps one worker's entries in the Redis prefix index in step with its engine's KV events.

Runs a :class:`~router.kv_events.KVEventSubscriber` on the engine's ZMQ endpoint and applies each
batch to a :class:`~router.prefix_index.PrefixIndex` under the worker's id. On start, and whenever
the subscriber reports lost events (:class:`~router.kv_events.Resync`), the worker's entries are
cleared first: the index may then under-report that worker's cache until new events arrive, but it
never claims blocks the engine no longer holds.

Optionally it cross-checks the router's hashing against the engine: for ``BlockStored`` events
that start a prompt (no parent, no LoRA/extra keys) it recomputes the hashes from the published
token ids with a :class:`~router.block_hash.BlockHasher` and logs an error on a mismatch (wrong
PYTHONHASHSEED, algorithm or block size would make every lookup miss).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import zmq.asyncio

from router.block_hash import BlockHasher
from router.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventSubscriber,
    Resync,
    SubscriberConfig,
)
from router.prefix_index import PrefixIndex
from router.redis_client import UNAVAILABLE_ERRORS, stop_task

logger = logging.getLogger(__name__)

__all__ = ["IndexUpdater", "IndexUpdaterConfig", "UpdaterStats"]


@dataclass
class IndexUpdaterConfig:
    """Which worker's events to follow and how."""

    worker_id: str
    """Registry id of the worker whose engine publishes on ``subscriber.endpoint``."""
    subscriber: SubscriberConfig
    """Endpoint, replay endpoint and topic of the engine's KV event publisher."""
    mediums: tuple[str, ...] | None = None
    """Accept only events of these storage mediums (e.g. ``("GPU",)``); None accepts all."""
    clear_on_start: bool = True
    """Drop the worker's existing entries before following the stream (stale after a restart)."""
    verify_first: int = 16
    """Hash-check this many eligible BlockStored events first (needs a hasher) ..."""
    verify_every: int = 256
    """... and then one in this many."""
    retry_backoff_s: float = 0.5
    """First wait before retrying Redis after a connection error (doubles each time) ..."""
    retry_backoff_max_s: float = 5.0
    """... up to this."""
    coalesce_s: float = 0.02
    """After a batch arrives, wait this long and apply it together with every batch that came
    meanwhile: one index write for several engine steps (an engine decoding a full batch
    fills a block nearly every step). The index learns of a block up to this much later; the
    gateways' dispatch ledgers cover what they have just sent. 0: one write per batch."""
    audit_interval_s: float = 2.0
    """How often the worker's entry count in Redis is compared with the local mirror, and its
    last writes checked (router/prefix_index.py, ``writes_intact``); on a difference (Redis
    restarted empty, entries deleted, a failover that lost acknowledged writes) the entries
    are written again."""


@dataclass
class UpdaterStats:
    """Counters of what the updater did."""

    batches: int = 0
    events: int = 0
    skipped_events: int = 0
    resyncs: int = 0
    hash_checks: int = 0
    hash_mismatches: int = 0
    redis_errors: int = 0
    rebuilds: int = 0
    coalesced_writes: int = 0


class IndexUpdater:
    """Task applying one engine's KV events to the prefix index under one worker id."""

    def __init__(
        self,
        index: PrefixIndex,
        config: IndexUpdaterConfig,
        hasher: BlockHasher | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        """Follow ``config``'s endpoint into ``index``; ``hasher`` enables hash cross-checks."""
        self.index = index
        self.config = config
        self.hasher = hasher
        self.subscriber = KVEventSubscriber(config.subscriber, context=context)
        self.stats = UpdaterStats()
        # Set once the socket is connected and the worker's stale entries are cleared.
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._audit_task: asyncio.Task[None] | None = None
        self._eligible = 0
        # The blocks the engine holds, as its events say: what the index is rebuilt from.
        self.blocks: set[int] = set()
        self._lock = asyncio.Lock()

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a background task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"kv-index-updater:{self.config.worker_id}")
        if self.config.audit_interval_s > 0 and (self._audit_task is None or self._audit_task.done()):
            self._audit_task = asyncio.create_task(self._audit_loop(),
                                                   name=f"kv-index-audit:{self.config.worker_id}")
        return self._task

    async def stop(self) -> None:
        """Cancel the background task and close the socket."""
        for task in (self._audit_task, self._task):
            if task is not None and not await stop_task(task):
                logger.warning("task %s did not stop", task.get_name())
        self._audit_task = self._task = None
        self.subscriber.close()

    async def run(self) -> None:
        """Follow the stream until cancelled, surviving Redis outages.

        If applying a batch fails because Redis is unreachable, that batch is lost to the index:
        the updater waits (with backoff) until it can clear the worker's entries, then goes on.
        Meanwhile ZMQ keeps buffering events (up to the receive high-water mark).
        """
        self.subscriber.connect()
        try:
            if self.config.clear_on_start:
                await self._clear_with_retry()
            self.ready.set()
            while True:
                items = [await self.subscriber.next()]
                if self.config.coalesce_s > 0 and isinstance(items[0], EventBatch):
                    await asyncio.sleep(self.config.coalesce_s)
                    items += await self.subscriber.ready_now()
                merged = coalesced(items)
                # `batches` counts the engine's batches, however many went into one write
                self.stats.batches += len(items) - len(merged)
                self.stats.coalesced_writes += len(items) > len(merged)
                for item in merged:
                    async with self._lock:
                        try:
                            await self.handle(item)
                        except UNAVAILABLE_ERRORS as exc:
                            self.stats.redis_errors += 1
                            logger.warning("worker %s: Redis unavailable (%s); rebuilding its "
                                           "index entries when it is back",
                                           self.config.worker_id, exc)
                            await self._rebuild_with_retry()
        finally:
            self.ready.clear()
            self.subscriber.close()

    async def rebuild(self) -> None:
        """Replace the worker's index entries with the mirror of what its engine holds."""
        await self.index.clear_worker(self.config.worker_id, self.blocks)
        if self.blocks:
            await self.index.add_blocks(self.config.worker_id, list(self.blocks))
        self.stats.rebuilds += 1

    async def _audit_loop(self) -> None:
        """Rebuild the worker's entries when Redis no longer holds as many as the mirror, or
        when its epoch is no longer current (another process cleared or purged it)."""
        await self.ready.wait()
        while True:
            await asyncio.sleep(self.config.audit_interval_s)
            async with self._lock:
                try:
                    held = await self.index.worker_block_count(self.config.worker_id)
                    current = await self.index.epoch_is_current(self.config.worker_id)
                    intact = current and await self.index.writes_intact(self.config.worker_id)
                    if held != len(self.blocks) or not intact:
                        logger.warning("worker %s: index holds %d of its %d blocks%s; "
                                       "rebuilding", self.config.worker_id, held,
                                       len(self.blocks), "" if intact else
                                       " and lost writes (or its epoch)")
                        await self.rebuild()
                except UNAVAILABLE_ERRORS:
                    self.stats.redis_errors += 1  # still away: the next audit tries again

    async def _rebuild_with_retry(self) -> None:
        await self._clear_with_retry(rebuild=True)

    async def clear_entries(self) -> None:
        """Delete the worker's index entries (its epoch and every block of the mirror)."""
        await self.index.clear_worker(self.config.worker_id, self.blocks)

    async def _clear_with_retry(self, rebuild: bool = False) -> None:
        delay = self.config.retry_backoff_s
        while True:
            try:
                if rebuild:
                    await self.rebuild()
                else:
                    await self.index.clear_worker(self.config.worker_id)
                return
            except UNAVAILABLE_ERRORS as exc:
                self.stats.redis_errors += 1
                logger.warning("worker %s: cannot clear index entries (%s); retrying in %.1fs",
                               self.config.worker_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_backoff_max_s)

    async def handle(self, item: EventBatch | Resync) -> None:
        """Apply one subscriber item to the index."""
        if isinstance(item, Resync):
            self.stats.resyncs += 1
            known = set(self.blocks)
            self.blocks.clear()  # events were lost: what the engine holds is unknown
            await self.index.clear_worker(self.config.worker_id, known)
            return
        events = item.events
        if self.config.mediums is not None:
            kept = [e for e in events if not isinstance(e, (BlockStored, BlockRemoved)) or e.medium in self.config.mediums]
            self.stats.skipped_events += len(events) - len(kept)
            events = kept
        held = set(self.blocks)  # what the index may hold for this worker before the batch
        after_clear = 0
        for i, event in enumerate(events):
            if isinstance(event, BlockStored):
                self.blocks.update(event.block_hashes)  # type: ignore[arg-type]
                held.update(event.block_hashes)  # type: ignore[arg-type]
                if self.hasher is not None:
                    self._maybe_verify(event)
            elif isinstance(event, BlockRemoved):
                self.blocks.difference_update(event.block_hashes)  # type: ignore[arg-type]
            elif isinstance(event, AllBlocksCleared):
                self.blocks.clear()
                after_clear = i + 1
        if after_clear:
            # one clear that also deletes every block the index may hold (nothing left for
            # the sweep), then what came after the last AllBlocksCleared
            await self.index.clear_worker(self.config.worker_id, held)
        await self.index.apply(self.config.worker_id, events[after_clear:])
        self.stats.batches += 1
        self.stats.events += len(events)

    def _maybe_verify(self, event: BlockStored) -> None:
        if event.parent_block_hash is not None or event.lora_name:
            return
        if event.extra_keys and any(k is not None for k in event.extra_keys):
            return  # vLLM publishes one entry per block, None where a block has no extra keys
        self._eligible += 1
        n = self._eligible
        if n > self.config.verify_first and n % self.config.verify_every:
            return
        self.verify(event)

    def verify(self, event: BlockStored) -> bool:
        """Recompute a prompt-initial BlockStored's hashes with the hasher; log and count a mismatch."""
        assert self.hasher is not None
        self.stats.hash_checks += 1
        ok = event.block_size == self.hasher.block_size and self.hasher.block_hashes(event.token_ids) == list(
            event.block_hashes
        )
        if not ok:
            self.stats.hash_mismatches += 1
            logger.error(
                "worker %s: the router's block hashes do not match the engine's (engine block_size=%d, "
                "router %r). Check that engine and router share prefix_caching_hash_algo, block size and "
                "PYTHONHASHSEED; until then KV-aware routing finds no cache hits.",
                self.config.worker_id, event.block_size, self.hasher,
            )
        return ok


def coalesced(items: list[EventBatch | Resync]) -> list[EventBatch | Resync]:
    """Consecutive batches merged into one (events in order, the last one's sequence number
    and time); a Resync stays where it is, between the batches before and after it."""
    out: list[EventBatch | Resync] = []
    for item in items:
        last = out[-1] if out else None
        if isinstance(item, EventBatch) and isinstance(last, EventBatch) \
                and item.data_parallel_rank == last.data_parallel_rank:
            out[-1] = EventBatch(item.seq, item.ts, [*last.events, *item.events],
                                 item.data_parallel_rank)
        else:
            out.append(item)
    return out
