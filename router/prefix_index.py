"""Redis prefix index: which worker holds which KV-cache blocks, on one Redis or a Redis Cluster.

Keys (router/index_layout.py): the buckets and change log of each *partition* share one hash
slot; a block's bucket is its hash's top ``bucket_bits`` bits; a bucket holds members
``<16 hex digits of the block hash><epoch id>``. The epoch metadata (``{ns:kv}:ids`` and
friends) is one more slot. Every key a command or script touches is declared.

**Epochs.** A worker writes under a compact *epoch id* allocated in ``{ns:kv}:ids``. Clearing a
worker (start, lost events, ``AllBlocksCleared``, death) retires its epoch in ONE metadata
write: from then on no lookup counts any entry of the old epoch, wherever it lies, so a clear is
exact and O(1). When the caller knows the blocks (the updater's mirror of its engine) they are
deleted at once; otherwise (a crashed worker) :meth:`PrefixIndex.purge_dead` sweeps the retired
epochs' members out of the buckets later.

**Writes** (:meth:`PrefixIndex.apply`): one event batch (an engine step) is collapsed to its
final state per block and sent as plain ZADD/ZREM per bucket touched plus, for each partition
touched, one ``XADD`` of the change to the partition's log (``c`` epoch id, ``a`` hashes added,
``r`` hashes removed, as concatenated 16-hex-digit strings), after that partition's bucket
writes: one burst of commands per shard, all shards in parallel. The worker's block count
(an INCRBY by what the ZADD/ZREM replies say changed) rides with the next batch's burst
(:meth:`PrefixIndex.flush_counts` sends it at once; the count readers call it). Every change
of a bucket, sweeps included, goes through the log, so a gateway can keep a replica
(router/index_replica.py). Epoch allocations and retirements are logged in
``{ns:kv}:log`` by the scripts that make them.

**Lookups** (:meth:`PrefixIndex.longest_prefixes`) take the prompt's block hashes in order:

- on one Redis, ONE ``EVALSHA`` of a read-only script (keys declared: the epoch map, the
  candidates' alive keys, one bucket per block) walks the blocks and stops as soon as no live
  candidate holds the next one;
- on a Redis Cluster, ONE pipeline: a ``ZRANGEBYLEX`` per block, the epoch-map version and the
  candidates' alive keys, grouped per shard and sent to all shards in parallel; the prefix walk
  happens in the client. The epoch map is cached and re-read (a second round trip) only when its
  version changed, so a cleared worker's old entries never count.

Liveness is exact: a lookup counts a worker only while its alive key exists. On a cluster,
``liveness_cache_s > 0`` lets a client reuse an alive key's remaining TTL (read with ``PTTL``)
for up to that long, so that most lookups read no alive key at all: a worker is still dropped
when its key *expires*; only a key deleted early (deregistration, which also clears the worker)
can be seen up to ``liveness_cache_s`` late.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from router.cluster_nodes import NodeClients
from router.index_layout import IndexLayout
from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.registry import DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NAMESPACE", "PrefixIndex", "hash_hex"]

# KEYS: ids, names, next, ver, meta log, layout. ARGV: worker, log maxlen, layout signature.
# Returns the worker's epoch id, allocating (and logging) one; an error if the index was
# written under another layout.
_EPOCH_LUA: Final = """
local layout = redis.call('GET', KEYS[6])
if not layout then
  redis.call('SET', KEYS[6], ARGV[3])
elseif layout ~= ARGV[3] then
  return redis.error_reply('LAYOUT this prefix index is written with ' .. layout ..
    ', this client uses ' .. ARGV[3])
end
local cid = redis.call('HGET', KEYS[1], ARGV[1])
if cid then return cid end
cid = tostring(redis.call('INCR', KEYS[3]))
redis.call('HSET', KEYS[1], ARGV[1], cid)
redis.call('HSET', KEYS[2], cid, ARGV[1])
redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 'o', 'n', 'w', ARGV[1], 'c', cid)
return cid
"""

# KEYS: ids, ver, retired, meta log. ARGV: now, log maxlen, worker... Retires their epochs
# (and logs it); returns {worker, cid, ...}.
_RETIRE_LUA: Final = """
local out = {}
for i = 3, #ARGV do
  local cid = redis.call('HGET', KEYS[1], ARGV[i])
  if cid then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), cid)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'o', 'x', 'w', ARGV[i], 'c', cid)
    out[#out + 1] = ARGV[i]
    out[#out + 1] = cid
  end
end
if #out > 0 then redis.call('INCR', KEYS[2]) end
return out
"""

# KEYS: ids, alive_1..alive_n, bucket_1..bucket_m. ARGV: n, worker_1..worker_n, hex hashes.
# Returns {worker, prefix_blocks, ...} for every live candidate. n < 0: -n candidates, taken
# as live, no alive keys in KEYS (liveness is read from the registry's own Redis).
_LOOKUP_LUA: Final = """
local nw = tonumber(ARGV[1])
local nalive = nw
if nw < 0 then
  nw = -nw
  nalive = 0
end
local depth, order, active, nactive = {}, {}, {}, 0
if nw > 0 then
  local names = {}
  for i = 1, nw do names[i] = ARGV[1 + i] end
  local cids = redis.call('HMGET', KEYS[1], unpack(names))
  for i = 1, nw do
    local w = names[i]
    if depth[w] == nil and (nalive == 0 or redis.call('EXISTS', KEYS[1 + i]) == 1) then
      depth[w] = 0
      order[#order + 1] = w
      if cids[i] then
        active[cids[i]] = w
        nactive = nactive + 1
      end
    end
  end
end
local hexes = ARGV[2 + nw] or ''
local nblocks = math.floor(#hexes / 16)
local n = 0
while nactive > 0 and n < nblocks do
  n = n + 1
  local h = string.sub(hexes, n * 16 - 15, n * 16)
  local members = redis.call('ZRANGEBYLEX', KEYS[1 + nalive + n], '(' .. h, '(' .. h .. ':')
  local still, cnt = {}, 0
  for _, m in ipairs(members) do
    local cid = string.sub(m, 17)
    local w = active[cid]
    if w then
      still[cid] = w
      cnt = cnt + 1
      depth[w] = n
    end
  end
  active, nactive = still, cnt
end
local out = {}
for _, w in ipairs(order) do
  out[#out + 1] = w
  out[#out + 1] = depth[w]
end
return out
"""


def hash_hex(block_hash: int) -> str:
    """The 16-hex-digit form of a published 64-bit block hash (members and lookups use it)."""
    return f"{block_hash:016x}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _entry_id(raw: Any) -> tuple[int, int]:
    ms, _, seq = _text(raw).partition("-")
    return int(ms), int(seq or 0)


class PrefixIndex:
    """Per-worker block membership in Redis (or a Redis Cluster) with longest-prefix lookups."""

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        max_ops_per_call: int = 4096,
        clear_chunk: int = 2048,
        bucket_bits: int = 16,
        partitions: int = 3,
        log_maxlen: int = 100_000,
        liveness_cache_s: float = 0.0,
        close_client: bool = False,
        registry: aioredis.Redis | None = None,
    ) -> None:
        """Use ``redis`` (a ``Redis`` or a ``RedisCluster``, any ``decode_responses``).

        ``max_ops_per_call`` bounds the members in one ZADD/ZREM and ``clear_chunk`` the keys
        swept per pipeline, so no single command blocks Redis long. ``bucket_bits`` and
        ``partitions``: see router/index_layout.py (every writer and reader of one index must
        use the same values). ``log_maxlen``: entries each change log keeps (at least: Redis
        trims whole nodes of a stream; a replica that falls further behind warms again). ``liveness_cache_s`` (cluster only): see the
        module doc. ``close_client``: :meth:`aclose` closes ``redis`` too (a client made for
        the index alone, router.redis_client.index_redis_client). ``registry``: the Redis of
        the worker registry, where the workers' liveness keys are, when the index has a Redis
        of its own (None: ``redis`` holds both).
        """
        self.layout = layout = IndexLayout(namespace, bucket_bits, partitions)
        self.redis = redis
        self.namespace = namespace
        self.max_ops_per_call = max_ops_per_call
        self.clear_chunk = clear_chunk
        self.bucket_bits = bucket_bits
        self.log_maxlen = log_maxlen
        self.liveness_cache_s = liveness_cache_s
        self._close_client = close_client
        self.clustered = isinstance(redis, RedisCluster)
        self.nodes = NodeClients(redis)
        self.registry = registry if registry is not None else redis
        self.registry_nodes = NodeClients(registry) if registry is not None else self.nodes
        self.ids_key = layout.ids_key
        self.names_key = layout.names_key
        self.next_key = layout.next_key
        self.ver_key = layout.ver_key
        self.retired_key = layout.retired_key
        self.meta_log_key = layout.meta_log_key
        self._bucket_prefixes = [f"{{{t}}}:b:" for t in layout.tags]
        self._log_keys = [layout.log_key(p) for p in range(partitions)]
        self._epoch_script = redis.register_script(_EPOCH_LUA)
        self._retire_script = redis.register_script(_RETIRE_LUA)
        self._lookup_script = redis.register_script(_LOOKUP_LUA)
        self._own: dict[str, str] = {}  # writer side: worker -> epoch id it writes under
        self._pending_counts: dict[str, int] = {}  # writer side: count key -> delta not sent
        # writer side: worker -> partition -> id of the last log entry written for its epoch
        self._last_entries: dict[str, dict[int, Any]] = {}
        self._epochs: dict[str, str] | None = None  # reader side (cluster): worker -> epoch id
        self._epochs_ver: bytes | str | None = None
        self._lease: dict[str, float] = {}  # reader side (cluster): worker -> alive until

    # -- keyspace ------------------------------------------------------------------------------

    def block_key(self, block_hash: int) -> str:
        """Key of the bucket (ZSET) that holds ``block_hash``'s members."""
        return self.layout.bucket_key(block_hash)

    def count_key(self, worker_id: str) -> str:
        """Key of the number of blocks ``worker_id``'s current epoch holds."""
        return self.layout.count_key(worker_id)

    def bucket_pattern(self) -> str:
        """SCAN pattern matching every bucket key."""
        return self.layout.bucket_pattern()

    def alive_key(self, worker_id: str) -> str:
        """The registry's liveness key of ``worker_id`` (read only here)."""
        return self.layout.alive_key(worker_id)

    @property
    def workers_key(self) -> str:
        """The registry's set of known worker ids (read only here)."""
        return self.layout.workers_key

    # -- epochs ----------------------------------------------------------------------------------

    async def epoch(self, worker_id: str) -> str:
        """The epoch id ``worker_id`` writes under (allocated on first use, then cached)."""
        cid = self._own.get(worker_id)
        if cid is None:
            cid = _text(await self._epoch_script(
                keys=[self.ids_key, self.names_key, self.next_key, self.ver_key,
                      self.meta_log_key, self.layout.layout_key],
                args=[worker_id, self.log_maxlen, self.layout.signature]))
            self._own[worker_id] = cid
        return cid

    async def epoch_is_current(self, worker_id: str) -> bool:
        """Whether the epoch this client writes ``worker_id`` under is still the index's.

        False after another process cleared or purged the worker, or after Redis lost the
        metadata (a restart without persistence): the writer must then write its blocks again.
        """
        cid = self._own.get(worker_id)
        if cid is None:
            return True  # nothing written yet: the next write allocates one
        current = await self.redis.hget(self.ids_key, worker_id)
        if current is None or _text(current) != cid:
            self._own.pop(worker_id, None)
            return False
        return True

    async def _retire(self, worker_ids: Sequence[str]) -> dict[str, str]:
        flat = await self._retire_script(
            keys=[self.ids_key, self.ver_key, self.retired_key, self.meta_log_key],
            args=[int(time.time()), self.log_maxlen, *worker_ids])
        for w in worker_ids:
            self._own.pop(w, None)
            self._last_entries.pop(w, None)
        return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}

    # -- writes ----------------------------------------------------------------------------------

    async def apply(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        """Apply one engine's events, in order: BlockStored adds, BlockRemoved drops, AllBlocksCleared clears."""
        _check_worker_id(worker_id)
        final: dict[int, bool] = {}
        for event in events:
            if isinstance(event, BlockStored):
                final.update(dict.fromkeys(event.block_hashes, True))  # type: ignore[arg-type]
            elif isinstance(event, BlockRemoved):
                final.update(dict.fromkeys(event.block_hashes, False))  # type: ignore[arg-type]
            elif isinstance(event, AllBlocksCleared):
                final.clear()  # everything before the clear is moot
                await self.clear_worker(worker_id)
        await self._write(worker_id, final, defer_count=True)

    async def add_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``worker_id`` holds ``block_hashes`` (as a BlockStored would)."""
        _check_worker_id(worker_id)
        await self._write(worker_id, dict.fromkeys(block_hashes, True))

    async def _write(self, worker_id: str, final: dict[int, bool], defer_count: bool = False
                     ) -> None:
        """Write a batch's final states; the worker's block count follows in the same
        round trip as the next batch (``defer_count``) or at once."""
        if not final:
            return
        cid = await self.epoch(worker_id)
        adds = [h for h, stored in final.items() if stored]
        rems = [h for h, stored in final.items() if not stored]
        delta = await self._mutate(cid, adds, rems, self._pending_counts,
                                   self._last_entries.setdefault(worker_id, {}))
        if delta:
            key = self.count_key(worker_id)
            self._pending_counts[key] = self._pending_counts.get(key, 0) + delta
        if not defer_count:
            await self.flush_counts()

    async def flush_counts(self) -> None:
        """Send the block-count changes still held back (see :meth:`apply`)."""
        if self._pending_counts:
            pending, self._pending_counts = self._pending_counts, {}
            await self.nodes.run([("INCRBY", k, d) for k, d in pending.items()], writes=True)

    async def _mutate(self, cid: str, adds: Iterable[int], rems: Iterable[int],
                      counts: dict[str, int] | None = None,
                      entries: dict[int, Any] | None = None) -> int:
        """Add and remove members of epoch ``cid`` (each block once) and log the change per
        partition, in one burst per shard; returns members added less members removed.
        ``counts`` (count key -> delta) go out in the same burst, and are then cleared;
        ``entries`` gets each partition's log entry id."""
        layout = self.layout
        shift, nparts, prefixes = layout.shift, layout.partitions, self._bucket_prefixes
        # partition -> ({bucket key: [member]} added, the same removed, [hex] added, [hex] removed)
        parts: dict[int, tuple[dict[str, list[str]], dict[str, list[str]], list[str], list[str]]] = {}
        for which, hashes in ((0, adds), (1, rems)):
            for h in hashes:
                b = h >> shift
                p = b % nparts
                part = parts.get(p)
                if part is None:
                    part = parts[p] = ({}, {}, [], [])
                hx = f"{h:016x}"
                key = f"{prefixes[p]}{b:x}"
                members = part[which].get(key)
                if members is None:
                    part[which][key] = [hx + cid]
                else:
                    members.append(hx + cid)
                part[2 + which].append(hx)
        if not parts:
            return 0
        step = self.max_ops_per_call
        cmds: list[tuple] = []
        route: list[str] = []  # a key of each command's slot: one routing per partition
        signs: list[int] = []
        logged: list[tuple[int, int]] = []  # (partition, index of its XADD)
        for p, (add_by_key, rem_by_key, add_hex, rem_hex) in parts.items():
            n = len(cmds)
            for key, members in add_by_key.items():
                if len(members) == 1:
                    cmds.append(("ZADD", key, 0, members[0]))
                    continue
                for i in range(0, len(members), step):
                    cmds.append(("ZADD", key, *[x for m in members[i:i + step] for x in (0, m)]))
            signs += [1] * (len(cmds) - n)
            n = len(cmds)
            for key, members in rem_by_key.items():
                for i in range(0, len(members), step):
                    cmds.append(("ZREM", key, *members[i:i + step]))
            signs += [-1] * (len(cmds) - n)
            # after the partition's bucket writes, on the same connection: a reader that sees
            # the entry sees the writes
            log = self._log_keys[p]
            cmds.append(("XADD", log, "MAXLEN", "~", self.log_maxlen, "*",
                         "c", cid, "a", "".join(add_hex), "r", "".join(rem_hex)))
            signs.append(0)
            logged.append((p, len(cmds) - 1))
            route += [log] * (len(cmds) - len(route))
        if counts:
            for key, d in counts.items():
                cmds.append(("INCRBY", key, d))
                signs.append(0)
                route.append(key)
            counts.clear()
        results = await self.nodes.run(cmds, writes=True, route=route)  # ZADD/ZREM: idempotent
        if entries is not None:
            for p, i in logged:
                entries[p] = results[i]
        return sum(s * int(c) for s, c in zip(signs, results) if s)

    async def writes_intact(self, worker_id: str) -> bool:
        """Whether every write this client made for ``worker_id``'s current epoch is still in
        Redis. False after a shard's primary died and its promoted replica lacks writes the
        primary had acknowledged (replication is asynchronous): the caller must write the
        worker's blocks again (under a new epoch). Checked by the last change-log entry this
        client wrote to each partition: replication keeps a prefix of a shard's writes, so
        if that entry survived, every write before it did (an entry trimmed away as old
        counts as kept)."""
        last = self._last_entries.get(worker_id)
        if not last or worker_id not in self._own:
            return True
        items = list(last.items())
        cmds: list[tuple] = []
        for p, eid in items:
            key = self.layout.log_key(p)
            cmds += [("XRANGE", key, eid, eid), ("XRANGE", key, "-", "+", "COUNT", 1)]
        res = await self.nodes.run(cmds)
        for k, (p, eid) in enumerate(items):
            found, first = res[2 * k], res[2 * k + 1]
            if not found and not (first and _entry_id(first[0][0]) > _entry_id(eid)):
                return False
        return True

    async def clear_worker(self, worker_id: str, blocks: Iterable[int] | None = None) -> None:
        """Drop every index entry of ``worker_id`` at once (its epoch is retired).

        ``blocks``: the blocks the worker's current epoch holds, when the caller knows them
        (an updater's mirror); they are deleted now. Otherwise the retired epoch's members
        stay in Redis, uncounted, until :meth:`purge_dead` sweeps them.
        """
        _check_worker_id(worker_id)
        retired = await self._retire([worker_id])
        self._pending_counts.pop(self.count_key(worker_id), None)
        self._last_entries.pop(worker_id, None)
        await self.redis.delete(self.count_key(worker_id))
        cid = retired.get(worker_id)
        if cid is None or blocks is None:
            return
        hashes = list(dict.fromkeys(blocks))
        chunk = self.clear_chunk * 8
        for start in range(0, len(hashes), chunk):
            await self._mutate(cid, (), hashes[start:start + chunk])

    async def purge_dead(self) -> list[str]:
        """Retire the epochs of indexed workers whose alive key is gone, sweep retired epochs'
        members out of the buckets, and return the ids of the workers retired now."""
        indexed = [_text(w) for w in await self.redis.hkeys(self.ids_key)]
        dead: list[str] = []
        if indexed:
            alive = await self.registry_nodes.run([("EXISTS", self.alive_key(w))
                                                   for w in indexed])
            dead = [w for w, a in zip(indexed, alive) if not a]
        if dead:
            await self._retire(dead)
            await self.nodes.run([("DEL", self.count_key(w)) for w in dead])
            logger.info("retired prefix-index entries of dead workers: %s", dead)
        await self.sweep()
        return dead

    async def sweep(self) -> int:
        """Remove the members of every retired epoch from the buckets; returns how many.

        One SCAN over every primary; buckets are read ``clear_chunk`` at a time and the
        retired members removed through the change logs. Epochs retired while the sweep runs
        wait for the next one.
        """
        retired = [_text(c) for c in await self.redis.zrange(self.retired_key, 0, -1)]
        if not retired:
            return 0
        dead = set(retired)
        removed = 0
        batch: list[Any] = []

        async def flush() -> None:
            # read the buckets, then delete the retired epochs' members: a retired epoch is
            # never written again, so nothing between the two steps can make a removal wrong
            nonlocal removed
            contents = await self.nodes.run([("ZRANGE", key, 0, -1) for key in batch])
            by_cid: dict[str, list[int]] = {}
            for members in contents:
                for m in members:
                    m = _text(m)
                    if m[16:] in dead:
                        by_cid.setdefault(m[16:], []).append(int(m[:16], 16))
            for c, hashes in by_cid.items():
                await self._mutate(c, (), hashes)
                removed += len(hashes)
            batch.clear()

        async for key in self.redis.scan_iter(match=self.bucket_pattern(), count=1000):
            batch.append(key)
            if len(batch) >= self.clear_chunk:
                await flush()
        if batch:
            await flush()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.retired_key, *retired)
            pipe.hdel(self.names_key, *retired)
            await pipe.execute()
        return removed

    # -- reads -----------------------------------------------------------------------------------

    async def longest_prefixes(
        self, block_hashes: Sequence[int], worker_ids: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Longest cached prefix (in blocks, from the first) of every live worker.

        ``worker_ids=None`` considers every worker in the registry set (one more round trip to
        read it); otherwise only those given. Workers whose alive key does not exist are left
        out; live workers with no match map to 0.
        """
        if worker_ids is None:
            worker_ids = sorted(_text(w) for w in await self.registry.smembers(self.workers_key))
        if self.clustered:
            return await self._lookup_cluster(block_hashes, worker_ids)
        names = list(dict.fromkeys(worker_ids))
        bucket_key = self.layout.bucket_key
        hexes = "".join([f"{h:016x}" for h in block_hashes])
        buckets = [bucket_key(h) for h in block_hashes]
        if self.registry_nodes is self.nodes:
            keys = [self.ids_key, *[self.alive_key(w) for w in names], *buckets]
            flat = await self._lookup_script(keys=keys, args=[len(names), *names, hexes])
            return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        flat, alive = await asyncio.gather(  # liveness from the registry's Redis meanwhile
            self._lookup_script(keys=[self.ids_key, *buckets], args=[-len(names), *names, hexes]),
            self.registry_nodes.run([("EXISTS", self.alive_key(w)) for w in names]))
        live = {w for w, a in zip(names, alive) if a}
        out = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return {w: d for w, d in out.items() if w in live}

    async def _lookup_cluster(self, block_hashes: Sequence[int], worker_ids: Sequence[str]
                              ) -> dict[str, int]:
        names = list(dict.fromkeys(worker_ids))
        sent = time.monotonic()
        cache_s = self.liveness_cache_s
        check = [w for w in names if self._lease.get(w, 0.0) <= sent] if cache_s > 0 else names
        bucket_key = self.layout.bucket_key
        op = "PTTL" if cache_s > 0 else "EXISTS"
        alive_cmds = [(op, self.alive_key(w)) for w in check]
        cmds: list[tuple] = [("GET", self.ver_key)]
        for h in block_hashes:
            hx = f"{h:016x}"
            cmds.append(("ZRANGEBYLEX", bucket_key(h), "(" + hx, "(" + hx + ":"))
        if self.registry_nodes is self.nodes:
            res = await self.nodes.run([cmds[0], *alive_cmds, *cmds[1:]])
            ver, states, holders = res[0], res[1:1 + len(check)], res[1 + len(check):]
        else:  # liveness from the registry's Redis, in parallel
            res, states = await asyncio.gather(self.nodes.run(cmds),
                                               self.registry_nodes.run(alive_cmds))
            ver, holders = res[0], res[1:]
        if cache_s > 0:
            for w, ttl_ms in zip(check, states):
                ttl_ms = int(ttl_ms)
                if ttl_ms == -2:  # no key: dead now
                    self._lease.pop(w, None)
                else:  # -1: no TTL (alive until deleted)
                    left = cache_s if ttl_ms < 0 else min(ttl_ms / 1000, cache_s)
                    self._lease[w] = sent + left
            live = [w for w in names if self._lease.get(w, 0.0) > sent]
        else:
            live = [w for w, e in zip(names, states) if e]
        if self._epochs is None or ver != self._epochs_ver:
            # the epoch map changed (a clear, a purge, a new worker): re-read it, and drop the
            # liveness leases too (a deregistration clears the worker)
            raw = await self.redis.hgetall(self.ids_key)
            self._epochs = {_text(k): _text(v) for k, v in raw.items()}
            self._epochs_ver = ver
            self._lease.clear()
        epochs = self._epochs
        depth = dict.fromkeys(live, 0)
        active = {epochs[w]: w for w in live if w in epochs}
        n = 0
        for members in holders:
            if not active:
                break
            n += 1
            still = {}
            for m in members:
                cid = _text(m)[16:]
                w = active.get(cid)
                if w is not None:
                    still[cid] = w
                    depth[w] = n
            active = still
        return depth

    async def aclose(self) -> None:
        """Close the per-node connections a cluster lookup opened (and the client, if
        ``close_client``)."""
        await self.nodes.aclose()
        if self.registry_nodes is not self.nodes:
            await self.registry_nodes.aclose()
        if self._close_client:
            await self.redis.aclose()

    async def worker_block_count(self, worker_id: str) -> int:
        """How many blocks the index attributes to ``worker_id``'s current epoch (this
        client's held-back count changes sent first)."""
        await self.flush_counts()
        return int(await self.redis.get(self.count_key(worker_id)) or 0)

    async def workers_holding(self, block_hash: int) -> set[str]:
        """Worker ids (live or not) whose current epoch holds ``block_hash``."""
        hx = f"{block_hash:016x}"
        members = await self.redis.zrangebylex(self.block_key(block_hash), "(" + hx, "(" + hx + ":")
        cids = {_text(m)[16:] for m in members}
        current = {_text(v): _text(k) for k, v in (await self.redis.hgetall(self.ids_key)).items()}
        return {current[c] for c in cids if c in current}


def _check_worker_id(worker_id: str) -> None:
    if not worker_id or not isinstance(worker_id, str):
        raise ValueError(f"invalid worker id {worker_id!r}")
