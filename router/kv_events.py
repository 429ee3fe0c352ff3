"""Decoder and asyncio subscriber for vLLM's ZMQ KV-cache event stream.

Wire format (``vllm/distributed/kv_events.py``, ``ZmqEventPublisher``): every step that changed the
prefix cache produces one multipart message on a PUB socket::

    [topic: bytes, seq: 8-byte big-endian uint, payload: msgpack]

``payload`` is a msgspec ``KVEventBatch`` encoded ``array_like``: ``[ts, events, dp_rank]``; each
event is a msgpack map tagged by ``"type"``: ``BlockStored`` (``block_hashes``,
``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``, ``lora_name``, ...),
``BlockRemoved`` (``block_hashes``, ``medium``, ...) or ``AllBlocksCleared``. Block hashes are ints
(low 64 bits of the digest) unless the engine runs with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``,
in which case they are digests; this module normalises both to the 64-bit int form.

The publisher BINDS for ``ipc://``/``inproc://``/wildcard ``tcp://*:port`` endpoints, so the
subscriber connects. Sequence numbers start at 0 and increase by one per batch; the optional
replay endpoint is a ROUTER socket that, given a start sequence number (8 bytes big-endian, sent
from a DEALER as ``[b"", seq]``), streams back every buffered batch with ``seq >= start`` as
``[b"", topic, seq, payload]`` and ends with ``[b"", b"", END_SEQ (= -1 as signed 8 bytes), b""]``.
It keeps only the last ``buffer_steps`` batches (default 10 000).

:class:`KVEventSubscriber` yields :class:`EventBatch` items in sequence order and a
:class:`Resync` item whenever events were irrecoverably lost (gap not covered by replay, publisher
restart, late join without replay): the consumer must then forget everything it knows about that
engine (clearing the worker's index entries is conservative: the index may under-report a cache,
never over-report one).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Union

import msgspec
import zmq
import zmq.asyncio

from router.block_hash import external_block_hash

logger = logging.getLogger(__name__)

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KVEvent",
    "KVEventSubscriber",
    "Resync",
    "SubscriberConfig",
    "SubscriberItem",
    "SubscriberStats",
    "decode_batch",
    "encode_batch",
]

#: End-of-replay marker sent by vLLM's replay ROUTER socket (``(-1).to_bytes(8, "big", signed=True)``).
END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)

_Hash = Union[int, bytes]


class _Event(msgspec.Struct, tag=True, omit_defaults=True, kw_only=True, gc=False):
    """Base of the decoded event structs (tagged by class name under the "type" key, as vLLM)."""


class BlockStored(_Event):
    """Full blocks entered the engine's prefix cache (newly computed, or reused and re-announced)."""

    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None

    def __post_init__(self) -> None:
        self.block_hashes = _normalise(self.block_hashes)
        if self.parent_block_hash is not None and not isinstance(self.parent_block_hash, int):
            self.parent_block_hash = external_block_hash(self.parent_block_hash)


class BlockRemoved(_Event):
    """Blocks left the engine's prefix cache (evicted or overwritten)."""

    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: int | None = None

    def __post_init__(self) -> None:
        self.block_hashes = _normalise(self.block_hashes)


class AllBlocksCleared(_Event):
    """The engine dropped its whole prefix cache (e.g. ``reset_prefix_cache``)."""


#: One decoded KV-cache event.
KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


def _normalise(hashes: list[_Hash]) -> list[_Hash]:
    """Convert digest-form hashes (bytes) to the 64-bit int form, in place when possible."""
    for i, h in enumerate(hashes):
        if not isinstance(h, int):
            hashes[i] = external_block_hash(h)
    return hashes


class _WireBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class _WireBatchRaw(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


@dataclass(slots=True)
class EventBatch:
    """One published batch: its sequence number, engine timestamp, events and DP rank."""

    seq: int
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


@dataclass(frozen=True, slots=True)
class Resync:
    """Events were lost: the consumer must drop all state derived from this engine's events."""

    reason: str
    expected_seq: int | None
    received_seq: int


#: What :class:`KVEventSubscriber` yields.
SubscriberItem = Union[EventBatch, Resync]

_batch_decoder = msgspec.msgpack.Decoder(_WireBatch)
_raw_batch_decoder = msgspec.msgpack.Decoder(_WireBatchRaw)
_event_decoder = msgspec.msgpack.Decoder(KVEvent)  # type: ignore[arg-type]
_encoder = msgspec.msgpack.Encoder()


def decode_batch(seq: int, payload: bytes) -> EventBatch:
    """Decode a msgpack ``KVEventBatch`` payload; events of unknown types are skipped with a warning."""
    try:
        wire = _batch_decoder.decode(payload)
        return EventBatch(seq, wire.ts, wire.events, wire.data_parallel_rank)
    except msgspec.ValidationError:
        raw = _raw_batch_decoder.decode(payload)
    events: list[KVEvent] = []
    for item in raw.events:
        try:
            events.append(_event_decoder.decode(item))
        except msgspec.ValidationError as exc:
            logger.warning("skipping undecodable KV event in batch %d: %s", seq, exc)
    return EventBatch(seq, raw.ts, events, raw.data_parallel_rank)


def encode_batch(ts: float, events: list[KVEvent], data_parallel_rank: int | None = None) -> bytes:
    """Encode a batch exactly as vLLM's publisher does (used by tests and replay tools)."""
    return _encoder.encode(_WireBatch(ts, events, data_parallel_rank))


@dataclass
class SubscriberConfig:
    """Where and how to subscribe to one engine's (one DP rank's) KV events."""

    endpoint: str
    """The engine's ``kv_events_config.endpoint`` as seen from here (``tcp://*:5557`` -> ``tcp://host:5557``)."""
    replay_endpoint: str | None = None
    """The engine's ``replay_endpoint`` (ROUTER) as seen from here; None disables repair by replay."""
    topic: str = ""
    """The engine's ``kv_events_config.topic`` (a prefix filter on the first frame)."""
    replay_timeout_s: float = 2.0
    """How long one replay request may take before the gap is treated as unrecoverable."""
    rcvhwm: int = 100_000
    """ZMQ receive high-water mark (messages beyond it are dropped by ZMQ and show up as a gap)."""


@dataclass
class SubscriberStats:
    """Counters describing the stream's health."""

    batches: int = 0
    events: int = 0
    gaps: int = 0
    replayed_batches: int = 0
    repaired_gaps: int = 0
    resyncs: int = 0
    malformed: int = 0
    last_seq: int | None = None


class KVEventSubscriber:
    """Async iterator over one engine's KV event batches, in order, with gap detection and repair.

    Usage::

        async with KVEventSubscriber(SubscriberConfig("ipc:///tmp/kv.sock")) as sub:
            async for item in sub:
                if isinstance(item, Resync): ...   # forget this engine's state
                else: ...                          # apply item.events
    """

    def __init__(self, config: SubscriberConfig, context: zmq.asyncio.Context | None = None) -> None:
        """Prepare a subscriber for ``config``; sockets come from ``context`` (default: the shared one)."""
        self.config = config
        self.context = context
        self.stats = SubscriberStats()
        self._sub: zmq.asyncio.Socket | None = None
        self._pending: deque[SubscriberItem] = deque()
        self._expected: int | None = None

    def connect(self) -> None:
        """Create the SUB socket and connect it (idempotent; the publisher may bind later)."""
        if self._sub is not None:
            return
        ctx = self.context or zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode("utf-8"))
        sock.connect(self.config.endpoint)
        self._sub = sock

    def close(self) -> None:
        """Close the socket; a later :meth:`connect` starts over (the next batch is a late join)."""
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        self._expected = None
        self._pending.clear()

    async def __aenter__(self) -> KVEventSubscriber:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[SubscriberItem]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SubscriberItem]:
        while True:
            yield await self.next()

    async def next(self) -> SubscriberItem:
        """Return the next batch (or a :class:`Resync`), waiting for the engine as long as needed."""
        while not self._pending:
            self.connect()
            assert self._sub is not None
            frames = await self._sub.recv_multipart()
            await self._handle(frames)
        return self._pending.popleft()

    async def ready_now(self) -> list[SubscriberItem]:
        """The batches (or Resyncs) that have arrived, in order, without waiting for more."""
        self.connect()
        assert self._sub is not None
        while True:
            try:
                frames = await self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            await self._handle(frames)
        items = list(self._pending)
        self._pending.clear()
        return items

    # -- internals ---------------------------------------------------------------------------

    async def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.malformed += 1
            logger.warning("ignoring malformed KV event message with %d frames", len(frames))
            return
        seq = int.from_bytes(frames[1], "big")
        try:
            batch = decode_batch(seq, frames[2])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # The batch is lost to us exactly as if it had been dropped: count it as a gap.
            self.stats.malformed += 1
            logger.warning("undecodable KV event batch %d: %s", seq, exc)
            return
        expected = self._expected
        if expected is None:
            if seq != 0:
                await self._recover(0, seq, "late_join")
        elif seq < expected:
            self._resync("publisher_restarted", expected, seq)
        elif seq > expected:
            self.stats.gaps += 1
            await self._recover(expected, seq, "gap")
        self._emit(batch)

    def _emit(self, batch: EventBatch) -> None:
        self._pending.append(batch)
        self._expected = batch.seq + 1
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        self.stats.last_seq = batch.seq

    def _resync(self, reason: str, expected: int | None, received: int) -> None:
        self.stats.resyncs += 1
        logger.warning(
            "KV event stream %s lost events (%s: expected seq %s, got %d); index entries must be rebuilt",
            self.config.endpoint, reason, expected, received,
        )
        self._pending.append(Resync(reason, expected, received))

    async def _recover(self, start: int, stop: int, reason: str) -> None:
        """Fill ``[start, stop)`` from the replay endpoint, or emit a :class:`Resync`."""
        batches = await self._replay(start, stop) if self.config.replay_endpoint else None
        if batches is None:
            self._resync(reason, start if reason != "late_join" else None, stop)
            return
        self.stats.repaired_gaps += 1
        self.stats.replayed_batches += len(batches)
        logger.info("KV event stream %s: replayed %d batches [%d, %d)", self.config.endpoint, len(batches), start, stop)
        for batch in batches:
            self._emit(batch)

    async def _replay(self, start: int, stop: int) -> list[EventBatch] | None:
        """Ask the engine's replay ROUTER for batches ``[start, stop)``; None unless all came back."""
        assert self.config.replay_endpoint is not None
        ctx = self.context or zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        got: dict[int, EventBatch] = {}
        try:
            sock.connect(self.config.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.replay_timeout_s
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), max(0.0, deadline - loop.time()))
                if len(frames) != 4:
                    continue
                _, _, seq_bytes, payload = frames
                if seq_bytes == END_SEQ:
                    break
                seq = int.from_bytes(seq_bytes, "big")
                if start <= seq < stop:
                    got[seq] = decode_batch(seq, payload)
        except asyncio.TimeoutError:
            logger.warning("KV event replay from %s timed out", self.config.replay_endpoint)
            return None
        except (zmq.ZMQError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("KV event replay from %s failed: %s", self.config.replay_endpoint, exc)
            return None
        finally:
            sock.close(linger=0)
        if len(got) != stop - start:
            logger.warning(
                "KV event replay incomplete: wanted [%d, %d), got %d batches (buffer_steps too small?)",
                start, stop, len(got),
            )
            return None
        return [got[s] for s in range(start, stop)]
