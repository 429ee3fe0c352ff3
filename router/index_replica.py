"""A gateway's local replica of the prefix index, kept coherent from the index's change logs.

Lookups from the replica need no Redis round trip. The protocol (docs/routing.md, "The
gateway's replica"):

- **Warm-up.** For each partition: read the position of the end of its change log, then read
  its buckets, then follow the log from that position. A change written while the buckets are
  read is both in the snapshot and in the log after that position; applying it twice is
  harmless (each entry sets a member's final state), and every change after the snapshot is
  applied. The epoch map (which worker an epoch id belongs to) warms the same way from
  ``{ns:kv}:ids`` and its log.
- **Following.** One blocking ``XREAD`` per change log (on a single Redis, one for all of
  them), on plain connections of the replica's own; each entry is applied in log order. After
  a read that returned changes the next waits until ``read_interval_ms`` after it, so that
  reads carry many changes each.
- **Staleness.** A partition counts as *synced* at the send time of the last read that
  returned the log's end. A lookup trusts a partition only while that time is within
  ``max_staleness_s``: the walk down the prompt's blocks stops at the first block of a
  partition that is not synced, and a replica whose epoch log is not synced reports nothing.
  So a lookup never counts a block whose removal was acknowledged more than
  ``max_staleness_s`` before, and between, lags only as much as delivery (measured: ``lag_ms``).
- **Failover, lost connections, trimmed logs.** After an error, a log is resumed only if the
  entry last applied is still in it (same history: a promoted replica that lacks it lost writes
  the replica saw, and a log trimmed past it lost entries the replica did not see); otherwise
  that partition warms again, alone.

A worker counts only if its epoch is current; liveness is the caller's (``eligible``: the
gateway's live workers).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis

from router.cluster_nodes import NodeClients
from router.prefix_depths import PrefixDepths
from router.prefix_index import PrefixIndex
from router.redis_client import stop_task
from router.replica_config import IndexReplicaConfig

logger = logging.getLogger(__name__)

__all__ = ["IndexReplica", "IndexReplicaConfig", "ReplicaStats"]

_NO_ENTRY = b"0-0"
_NOTHING: dict[int, Any] = {}  # what a partition that is not synced holds for a lookup


@dataclass
class ReplicaStats:
    """What a replica did."""

    entries: int = 0
    """change-log entries applied"""
    changes: int = 0
    """block changes (added or removed members) applied"""
    warms: int = 0
    """partitions (and epoch maps) read whole from Redis"""
    resumes: int = 0
    """logs resumed after an error with their history intact"""
    errors: int = 0
    """failed reads of a change log"""
    warm_s: float = 0.0
    """duration of the first whole warm-up"""


def _entry_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


def _unpack(hexes: bytes | str) -> tuple[int, ...]:
    raw = binascii.unhexlify(hexes)
    return struct.unpack(f">{len(raw) // 8}Q", raw)


# A block's holders. A partition is two dicts: ``d`` maps each block to its one holder's epoch
# id, or to ``_MULTI`` when it has several, listed (a tuple of epoch ids) in ``m``. ``d`` holds
# only ints, so the cyclic garbage collector never tracks it: a dict holding any tuple is
# walked whole by the collections it takes part in (about 65 ns per entry: 0.6-0.9 s for 10M
# blocks, the process stalled meanwhile, the log's changes waiting), and is tracked again by
# every tuple put in. Only ``m`` (the blocks held by several workers) is walked.

_MULTI = -1  # epoch ids are positive


def _add(d: dict[int, int], m: dict[int, tuple[int, ...]], h: int, cid: int) -> None:
    v = d.get(h)
    if v is None:
        d[h] = cid
    elif v != cid:
        if v != _MULTI:
            d[h] = _MULTI
            m[h] = (v, cid)
        else:
            t = m[h]
            if cid not in t:
                m[h] = t + (cid,)


def _remove(d: dict[int, int], m: dict[int, tuple[int, ...]], h: int, cid: int) -> None:
    v = d.get(h)
    if v is None:
        return
    if v == cid:
        del d[h]
    elif v == _MULTI:
        t = m[h]
        if cid in t:
            rest = tuple([c for c in t if c != cid])
            if len(rest) == 1:
                d[h] = rest[0]
                del m[h]
            else:
                m[h] = rest


class _Reader:
    """One connection of a node's pool held by a follow loop for its blocking reads (taking
    one from the pool per read costs more client CPU than the read itself); given back on an
    error, when the node changes, or when the loop ends."""

    def __init__(self) -> None:
        self._client: Any = None
        self._conn: Any = None

    async def read(self, client: Any, cmd: tuple) -> Any:
        """Send ``cmd`` to ``client``'s node and return its raw reply (an error reply
        raises)."""
        if self._client is not client:
            await self.drop()
        if self._conn is None:
            self._conn = await client.connection_pool.get_connection()
            self._client = client
        conn = self._conn
        await conn.send_packed_command(hiredis.pack_command(cmd), check_health=False)
        return await conn.read_response()

    async def drop(self) -> None:
        """Close the held connection (a reply may be half read) and give it back."""
        conn, client = self._conn, self._client
        self._conn = self._client = None
        if conn is not None:
            try:
                await conn.disconnect()
            finally:
                await client.connection_pool.release(conn)


class IndexReplica:
    """An in-memory copy of a :class:`PrefixIndex`, following its change logs."""

    def __init__(self, index: PrefixIndex, config: IndexReplicaConfig | None = None) -> None:
        """Replicate ``index`` (its client and layout); start with :meth:`start`."""
        self.index = index
        self.layout = index.layout
        self.config = cfg = config or IndexReplicaConfig()
        if cfg.read_count > index.log_maxlen:
            raise ValueError(f"read_count ({cfg.read_count}) must be at most the index's "
                             f"log_maxlen ({index.log_maxlen})")
        self.nodes = NodeClients(index.redis, decode_responses=False, dedicated=True)
        n = self.layout.partitions
        self._meta = n  # stream number of the epoch log
        self._parts: list[dict[int, int]] = [{} for _ in range(n)]  # see _add
        self._multi: list[dict[int, tuple[int, ...]]] = [{} for _ in range(n)]
        self._names: dict[int, str] = {}  # current epoch id -> worker
        self._cid_of: dict[str, int] = {}  # worker -> current epoch id
        self._ints: dict[bytes, int] = {}  # an epoch id's text -> one shared int object
        self._synced_at = [-math.inf] * (n + 1)
        self._last_id: list[bytes] = [_NO_ENTRY] * (n + 1)
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = ReplicaStats()
        #: recent lags (ms): an entry's time in its log id to its application here
        self.lag_ms: deque[float] = deque(maxlen=cfg.lag_samples)
        timeout = index.redis.get_connection_kwargs().get("socket_timeout")
        block = cfg.block_ms
        if timeout:
            block = max(1, min(block, int(timeout * 1000 / 2)))
        self._block_ms = block

    # -- life ------------------------------------------------------------------------------------

    def _stream_key(self, i: int) -> str:
        return self.layout.meta_log_key if i == self._meta else self.layout.log_key(i)

    async def start(self) -> None:
        """Warm up from Redis (every partition and the epoch map), then follow the logs;
        returns once caught up with what was logged meanwhile (or after 10 x
        ``max_staleness_s``: not synced yet, lookups under-report until it is)."""
        t0 = time.perf_counter()
        try:
            await self.nodes.initialize()
            await self._warm_meta()
            await asyncio.gather(*[self._warm_partition(p)
                                   for p in range(self.layout.partitions)])
        except BaseException:
            await self.nodes.aclose()
            raise
        self.stats.warm_s = time.perf_counter() - t0
        groups = ([[i] for i in range(self.layout.partitions + 1)] if self.nodes.clustered
                  else [list(range(self.layout.partitions + 1))])
        self._tasks = [asyncio.create_task(self._follow(g), name=f"index-replica:{g[0]}")
                       for g in groups]
        # caught up once (what was logged during the warm-up applied): synced from here on
        deadline = time.monotonic() + 10 * self.config.max_staleness_s
        while not self.synced() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop following and close the replica's connections."""
        for t in self._tasks:
            await stop_task(t)
        self._tasks = []
        await self.nodes.aclose()

    # -- warm-up ---------------------------------------------------------------------------------

    async def _log_end(self, i: int) -> bytes:
        key = self._stream_key(i)
        last = await self.nodes.client_for(key).xrevrange(key, count=1)
        return last[0][0] if last else _NO_ENTRY

    async def _warm_meta(self) -> None:
        i = self._meta
        layout = self.layout
        written = await self.nodes.client_for(layout.layout_key).get(layout.layout_key)
        if written is not None and written.decode() != layout.signature:
            raise ValueError(f"the prefix index is written with {written.decode()}; this "
                             f"replica uses {layout.signature}")
        end = await self._log_end(i)
        raw = await self.nodes.client_for(self.layout.ids_key).hgetall(self.layout.ids_key)
        self._cid_of = {k.decode(): int(v) for k, v in raw.items()}
        self._names = {c: w for w, c in self._cid_of.items()}
        self._last_id[i] = end
        self._synced_at[i] = time.monotonic()
        self.stats.warms += 1

    async def _bucket_keys(self, p: int) -> list[bytes | str]:
        client = self.nodes.client_for(self.layout.log_key(p))
        if self.nodes.clustered:
            slot = self.layout.slot_of(p)
            n = await client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
            keys = await client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, max(int(n), 1))
            return [k for k in keys if b"}:b:" in k]
        return [k async for k in client.scan_iter(
            match=self.layout.partition_bucket_pattern(p), count=1000)]

    async def _warm_partition(self, p: int) -> None:
        self._synced_at[p] = -math.inf
        end = await self._log_end(p)
        keys = await self._bucket_keys(p)
        client = self.nodes.client_for(self.layout.log_key(p))
        d: dict[int, int] = {}
        multi: dict[int, tuple[int, ...]] = {}
        step = self.config.warm_chunk
        for start in range(0, len(keys), step):
            async with client.pipeline(transaction=False) as pipe:
                for k in keys[start:start + step]:
                    pipe.zrange(k, 0, -1)
                contents = await pipe.execute()
            ints = self._ints
            for members in contents:
                for m in members:
                    raw = m[16:]
                    cid = ints.get(raw)
                    if cid is None:
                        cid = ints[raw] = int(raw)
                    _add(d, multi, int(m[:16], 16), cid)
        self._parts[p] = d
        self._multi[p] = multi
        self._last_id[p] = end
        self._synced_at[p] = time.monotonic()
        self.stats.warms += 1

    # -- following -------------------------------------------------------------------------------

    async def _follow(self, streams: list[int]) -> None:
        keys = [self._stream_key(i) for i in streams]
        count, block = self.config.read_count, self._block_ms
        interval = self.config.read_interval_ms / 1000
        broken = False
        reader = _Reader()
        try:
            while True:
                name = self.nodes.node_name(keys[0])
                try:
                    if broken:
                        await self._resume(streams)
                        broken = False
                    client = self.nodes.client(name)
                    sent = time.monotonic()
                    # the raw reply, parsed by hiredis, no per-entry dict: {key: [[id, [k, v,
                    # ...]], ...]} (RESP3), [[key, entries], ...] (RESP2), or None
                    resp = await reader.read(client, ("XREAD", "COUNT", count, "BLOCK", block,
                                                      "STREAMS", *keys,
                                                      *[self._last_id[i] for i in streams]))
                    pairs = resp.items() if isinstance(resp, dict) else (resp or [])
                    got = {k.decode(): entries for k, entries in pairs}
                    now_ms = time.time() * 1000
                    behind = False
                    for i, key in zip(streams, keys):
                        entries = got.get(key, ())
                        if len(entries) >= count and not await self._kept_since(i, client):
                            continue  # trimmed past this replica's position: warmed again
                        if entries:
                            self._apply(i, entries, now_ms)
                        if len(entries) < count:
                            self._synced_at[i] = sent
                        else:
                            behind = True
                    if got and not behind:  # let changes gather: fewer, fuller reads
                        pause = sent + interval - time.monotonic()
                        if pause > 0:
                            await asyncio.sleep(pause)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats.errors += 1
                    if not broken:
                        logger.warning("index replica: reading %s failed (%s: %s); resuming",
                                       keys[0] if len(keys) == 1 else "the change logs",
                                       type(exc).__name__, exc)
                    broken = True
                    await reader.drop()
                    await self.nodes.forget(name)
                    await asyncio.sleep(self.config.retry_s)
                    try:
                        await self.nodes.refresh_slots()
                    except Exception:
                        logger.debug("slot map refresh failed", exc_info=True)
        finally:
            await reader.drop()

    async def _kept_since(self, i: int, client: Any) -> bool:
        """After a full read (this replica is behind): whether the log still holds every entry
        after the last one applied; if not (trimmed meanwhile), warm stream ``i`` again.

        A log is only trimmed to keep ``log_maxlen`` (>= ``read_count``) newer entries, so a
        read that returns fewer than ``read_count`` entries cannot have skipped any. After a
        full one, the log's first entry (read after it) must not be past the last applied
        (when it is, the log may also just have been trimmed right after the read, this
        replica being about ``log_maxlen`` entries behind: it warms again all the same)."""
        first = await client.xrange(self._stream_key(i), count=1)
        if not first or _entry_id(first[0][0]) <= _entry_id(self._last_id[i]):
            return True
        logger.warning("index replica: %s was trimmed past its position; warming it again",
                       self._stream_key(i))
        if i == self._meta:
            await self._warm_meta()
        else:
            await self._warm_partition(i)
        return False

    async def _resume(self, streams: list[int]) -> None:
        """After an error: go on from the last entry applied where the log still has it;
        warm the partition (or the epoch map) again where it does not."""
        for i in streams:
            key = self._stream_key(i)
            last = self._last_id[i]
            intact = last == _NO_ENTRY or bool(
                await self.nodes.client_for(key).xrange(key, last, last))
            if intact:
                self.stats.resumes += 1
            elif i == self._meta:
                await self._warm_meta()
            else:
                logger.warning("index replica: %s lost entries (failover or trimmed); warming "
                               "the partition again", key)
                await self._warm_partition(i)

    def _apply(self, i: int, entries: list, now_ms: float) -> None:
        lag = self.lag_ms
        if i == self._meta:
            for eid, f in entries:  # fields o, w, c (as the scripts write them)
                w = f[3].decode()
                cid = int(f[5])
                if f[1] == b"n":
                    old = self._cid_of.get(w)
                    if old is not None:
                        self._names.pop(old, None)
                    self._cid_of[w] = cid
                    self._names[cid] = w
                elif self._cid_of.get(w) == cid:
                    del self._cid_of[w]
                    self._names.pop(cid, None)
                lag.append(now_ms - int(eid[:eid.index(b"-")]))
        else:
            d = self._parts[i]
            multi = self._multi[i]
            changes = 0
            ints = self._ints
            for eid, f in entries:  # fields c, a, r (as PrefixIndex._mutate writes them)
                raw = f[1]
                cid = ints.get(raw)
                if cid is None:
                    cid = ints[raw] = int(raw)
                a, r = f[3], f[5]
                if a:
                    hs = _unpack(a)
                    changes += len(hs)
                    for h in hs:  # _add, inlined: one call per change in the fleet
                        v = d.get(h)
                        if v is None:
                            d[h] = cid
                        elif v != cid:
                            if v != _MULTI:
                                d[h] = _MULTI
                                multi[h] = (v, cid)
                            else:
                                t = multi[h]
                                if cid not in t:
                                    multi[h] = t + (cid,)
                if r:
                    hs = _unpack(r)
                    changes += len(hs)
                    for h in hs:
                        _remove(d, multi, h, cid)
                lag.append(now_ms - int(eid[:eid.index(b"-")]))
            self.stats.changes += changes
        self._last_id[i] = entries[-1][0]
        self.stats.entries += len(entries)

    # -- reads -----------------------------------------------------------------------------------

    def synced(self, now: float | None = None) -> bool:
        """Whether every partition and the epoch map are synced (within ``max_staleness_s``)."""
        limit = (time.monotonic() if now is None else now) - self.config.max_staleness_s
        return min(self._synced_at) >= limit

    def longest_prefixes(self, block_hashes: Iterable[int],
                         eligible: Collection[str] | None = None,
                         now: float | None = None) -> PrefixDepths:
        """Longest cached prefix (in blocks, from the first) of each worker holding at least
        the prompt's first block: only those (a worker left out holds none of it), also
        listed per prefix length (:class:`~router.prefix_depths.PrefixDepths`).

        ``block_hashes`` may be lazy (router/block_hash.py ``iter_block_hashes``): the walk
        takes blocks only while some worker holds them. ``eligible``: count only these
        worker ids (a set); None: every worker with a current epoch. The walk stops at the
        first block of a partition that is not synced (see the module doc); with the epoch
        map not synced, nothing is reported.
        """
        out = PrefixDepths()
        limit = (time.monotonic() if now is None else now) - self.config.max_staleness_s
        synced = self._synced_at
        if synced[self._meta] < limit:
            return out
        names = self._names
        # a partition that is not synced answers nothing: the walk ends at its first block
        gets = [d.get if synced[p] >= limit else _NOTHING.get for p, d in enumerate(self._parts)]
        multis = self._multi
        shift, nparts = self.layout.shift, self.layout.partitions
        # the walk follows the workers (current epochs, eligible or not: the answer is
        # filtered at the end) holding every block so far: ``one`` while a single epoch
        # does, else the set ``active``; ``dropped`` gets (blocks, epochs) as they fall off
        dropped: list[tuple[int, Any]] = []
        one = -1
        active: set[int] = set()
        last: tuple[int, ...] = ()  # the holders of the block before, in the set phase
        n = 0
        for h in block_hashes:
            v = gets[(h >> shift) % nparts](h)
            if v is None:
                break
            if one >= 0:  # the common case past a shared prefix: one holder left
                # v: that holder's epoch, another one, or _MULTI (the holders in multis)
                if v != one and (v > 0 or one not in multis[(h >> shift) % nparts][h]):
                    break
            elif v > 0:  # one holder
                if n == 0:
                    if v not in names:
                        break
                    one = v
                else:
                    if v not in active:
                        break
                    active.discard(v)
                    dropped.append((n, active))
                    one, active = v, set()
            elif n == 0:
                last = multis[(h >> shift) % nparts][h]
                active = set(filter(names.__contains__, last))
                if len(active) < 2:
                    if not active:
                        break
                    one = active.pop()
            else:
                held = multis[(h >> shift) % nparts][h]
                # the same holders as the block before (a shared prefix's blocks): active
                # (a subset of them) stays as it is
                if held == last:
                    n += 1
                    continue
                last = held
                still = active.intersection(held)
                if not still:
                    break
                if len(still) < len(active):
                    dropped.append((n, active - still))
                    if len(still) == 1:
                        one = still.pop()
                    active = still
            n += 1
        if n == 0:
            return out
        dropped.append((n, one if one >= 0 else active))
        keep = None if eligible is None else eligible.__contains__
        for d, cids in reversed(dropped):
            if cids.__class__ is int:
                w = names.get(cids)
                if w is not None and (keep is None or keep(w)):
                    out.add_level(d, [w])
            else:
                out.add_level(d, list(filter(keep, map(names.get, cids))))
        return out

    def holders(self, block_hash: int) -> set[str]:
        """Workers (current epochs) the replica says hold ``block_hash``."""
        p = self.layout.partition_of(block_hash)
        v = self._parts[p].get(block_hash)
        cids = () if v is None else self._multi[p][block_hash] if v == _MULTI else (v,)
        return {self._names[c] for c in cids if c in self._names}

    @property
    def pairs(self) -> int:
        """(block, epoch) members held, retired epochs' included until their removal arrives."""
        return (sum(len(d) - len(m) for d, m in zip(self._parts, self._multi))
                + sum(len(t) for m in self._multi for t in m.values()))

    def lag_percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the recent lag samples, in ms (None: no sample)."""
        return self.lag_percentiles((q,))[0]

    def lag_percentiles(self, qs: Sequence[float]) -> list[float | None]:
        """The quantiles ``qs`` of the recent lag samples, in ms, sorted once (None: no
        sample)."""
        if not self.lag_ms:
            return [None] * len(qs)
        xs = sorted(self.lag_ms)
        return [xs[min(int(len(xs) * q), len(xs) - 1)] for q in qs]
