"""Redis prefix index: which worker holds which KV-cache blocks, on one Redis or a Redis Cluster.

Keyspace (``ns`` = namespace, default ``"splitserve"``; ``<h>`` = a block hash as 16 lowercase hex
digits, i.e. the 64-bit int vLLM publishes; ``<b>`` = the hash's top ``bucket_bits`` bits in hex)::

    ns:kv:b:{<b>}       ZSET, all scores 0, members "<h><cid>": worker epoch <cid> holds block <h>
    ns:kv:n:{<id>}      STRING: how many blocks worker <id>'s current epoch holds
    {ns:kv}:ids         HASH worker id -> its current epoch id <cid> (a small decimal integer)
    {ns:kv}:names       HASH <cid> -> worker id (current and retired epochs, until swept)
    {ns:kv}:next        STRING, the last <cid> allocated (INCR)
    {ns:kv}:ver         STRING, bumped whenever {ns:kv}:ids changes
    {ns:kv}:retired     ZSET <cid> -> unix time it was retired (garbage the sweep removes)

Registry keys, owned by ``router.registry`` and only read here::

    ns:workers              SET of known worker ids
    ns:worker:<id>:alive    STRING with a TTL, refreshed by the live worker

Every key a command touches is declared, and the text between braces is the Redis Cluster hash
tag: the ``{ns:kv}`` metadata lives in one slot, the buckets spread over all slots (65,536
buckets by default). A bucket holds the blocks whose hashes share their top bits, so a
prompt's blocks land on buckets all over the cluster; a member is ~20 bytes in a listpack
(compact worker epoch ids instead of worker names, no reverse set per block, no forward set
per worker).

**Epochs.** A worker writes under a compact *epoch id* allocated in ``{ns:kv}:ids``. Clearing a
worker (start, lost events, ``AllBlocksCleared``, death) retires its epoch in ONE metadata
write: from then on no lookup counts any entry of the old epoch, wherever it lies, so a clear is
exact and O(1). When the caller knows the blocks (the updater's mirror of its engine) they are
deleted at once; otherwise (a crashed worker) :meth:`PrefixIndex.purge_dead` sweeps the retired
epochs' members out of the buckets later.

**Writes** (:meth:`PrefixIndex.apply`): one event batch is collapsed to its final state per
block and sent as one ZADD/ZREM per bucket touched, in one pipeline: one round trip per shard
(in parallel on a cluster), then one INCRBY of the worker's block count.

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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.registry import DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NAMESPACE", "PrefixIndex", "hash_hex"]

# KEYS: ids, names, next, ver. ARGV: worker. Returns the worker's epoch id, allocating one.
_EPOCH_LUA: Final = """
local cid = redis.call('HGET', KEYS[1], ARGV[1])
if cid then return cid end
cid = tostring(redis.call('INCR', KEYS[3]))
redis.call('HSET', KEYS[1], ARGV[1], cid)
redis.call('HSET', KEYS[2], cid, ARGV[1])
redis.call('INCR', KEYS[4])
return cid
"""

# KEYS: ids, ver, retired. ARGV: now, worker... Retires their epochs; returns {worker, cid, ...}.
_RETIRE_LUA: Final = """
local out = {}
for i = 2, #ARGV do
  local cid = redis.call('HGET', KEYS[1], ARGV[i])
  if cid then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), cid)
    out[#out + 1] = ARGV[i]
    out[#out + 1] = cid
  end
end
if #out > 0 then redis.call('INCR', KEYS[2]) end
return out
"""

# KEYS: ids, alive_1..alive_n, bucket_1..bucket_m. ARGV: n, worker_1..worker_n, hex hashes.
# Returns {worker, prefix_blocks, ...} for every live candidate.
_LOOKUP_LUA: Final = """
local nw = tonumber(ARGV[1])
local depth, order, active, nactive = {}, {}, {}, 0
if nw > 0 then
  local names = {}
  for i = 1, nw do names[i] = ARGV[1 + i] end
  local cids = redis.call('HMGET', KEYS[1], unpack(names))
  for i = 1, nw do
    local w = names[i]
    if depth[w] == nil and redis.call('EXISTS', KEYS[1 + i]) == 1 then
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
  local members = redis.call('ZRANGEBYLEX', KEYS[1 + nw + n], '(' .. h, '(' .. h .. ':')
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
        liveness_cache_s: float = 0.0,
    ) -> None:
        """Use ``redis`` (a ``Redis`` or a ``RedisCluster``, any ``decode_responses``).

        ``max_ops_per_call`` bounds the members in one ZADD/ZREM and ``clear_chunk`` the keys
        swept per pipeline, so no single command blocks Redis long. ``bucket_bits`` sets the
        number of bucket keys (``2**bucket_bits``); every writer and reader of one index must
        use the same value. ``liveness_cache_s`` (cluster only): see the module doc.
        """
        if not namespace or any(c.isspace() or c in "{}" for c in namespace):
            raise ValueError(f"invalid namespace {namespace!r}")
        if not 1 <= bucket_bits <= 24:
            raise ValueError(f"bucket_bits must be in 1..24, not {bucket_bits}")
        self.redis = redis
        self.namespace = namespace
        self.max_ops_per_call = max_ops_per_call
        self.clear_chunk = clear_chunk
        self.bucket_bits = bucket_bits
        self.liveness_cache_s = liveness_cache_s
        self.clustered = isinstance(redis, RedisCluster)
        self._shift = 64 - bucket_bits
        self._bucket_fmt = f"{namespace}:kv:b:{{{{{{:0{(bucket_bits + 3) // 4}x}}}}}}"
        meta = f"{{{namespace}:kv}}"
        self.ids_key = f"{meta}:ids"
        self.names_key = f"{meta}:names"
        self.next_key = f"{meta}:next"
        self.ver_key = f"{meta}:ver"
        self.retired_key = f"{meta}:retired"
        self._epoch_script = redis.register_script(_EPOCH_LUA)
        self._retire_script = redis.register_script(_RETIRE_LUA)
        self._lookup_script = redis.register_script(_LOOKUP_LUA)
        self._own: dict[str, str] = {}  # writer side: worker -> epoch id it writes under
        self._epochs: dict[str, str] | None = None  # reader side (cluster): worker -> epoch id
        self._epochs_ver: bytes | str | None = None
        self._lease: dict[str, float] = {}  # reader side (cluster): worker -> alive until
        self._node_clients: dict[str, aioredis.Redis] = {}  # cluster: "host:port" -> client

    # -- keyspace ------------------------------------------------------------------------------

    def block_key(self, block_hash: int) -> str:
        """Key of the bucket (ZSET) that holds ``block_hash``'s members."""
        return self._bucket_fmt.format(block_hash >> self._shift)

    def count_key(self, worker_id: str) -> str:
        """Key of the number of blocks ``worker_id``'s current epoch holds."""
        return f"{self.namespace}:kv:n:{{{worker_id}}}"

    def bucket_pattern(self) -> str:
        """SCAN pattern matching every bucket key."""
        return f"{self.namespace}:kv:b:*"

    def alive_key(self, worker_id: str) -> str:
        """The registry's liveness key of ``worker_id`` (read only here)."""
        return f"{self.namespace}:worker:{worker_id}:alive"

    @property
    def workers_key(self) -> str:
        """The registry's set of known worker ids (read only here)."""
        return f"{self.namespace}:workers"

    # -- epochs ----------------------------------------------------------------------------------

    async def epoch(self, worker_id: str) -> str:
        """The epoch id ``worker_id`` writes under (allocated on first use, then cached)."""
        cid = self._own.get(worker_id)
        if cid is None:
            cid = _text(await self._epoch_script(
                keys=[self.ids_key, self.names_key, self.next_key, self.ver_key], args=[worker_id]))
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
        flat = await self._retire_script(keys=[self.ids_key, self.ver_key, self.retired_key],
                                         args=[int(time.time()), *worker_ids])
        for w in worker_ids:
            self._own.pop(w, None)
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
        await self._write(worker_id, final)

    async def add_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``worker_id`` holds ``block_hashes`` (as a BlockStored would)."""
        _check_worker_id(worker_id)
        await self._write(worker_id, dict.fromkeys(block_hashes, True))

    async def _write(self, worker_id: str, final: dict[int, bool]) -> None:
        if not final:
            return
        cid = await self.epoch(worker_id)
        adds: dict[str, list[str]] = {}
        rems: dict[str, list[str]] = {}
        for h, stored in final.items():
            (adds if stored else rems).setdefault(self.block_key(h), []).append(f"{h:016x}{cid}")
        step = self.max_ops_per_call
        cmds: list[tuple] = []
        signs: list[int] = []
        for groups, sign in ((adds, 1), (rems, -1)):
            for key, members in groups.items():
                for i in range(0, len(members), step):
                    chunk = members[i:i + step]
                    if sign > 0:
                        cmds.append(("ZADD", key, *[x for m in chunk for x in (0, m)]))
                    else:
                        cmds.append(("ZREM", key, *chunk))
                    signs.append(sign)
        if self.clustered:
            counts = await self._per_node(cmds, writes=True)  # ZADD/ZREM: idempotent
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for c in cmds:
                    pipe.execute_command(*c)
                counts = await pipe.execute()
        delta = sum(s * int(c) for s, c in zip(signs, counts))
        if delta:
            await self.redis.incrby(self.count_key(worker_id), delta)

    async def clear_worker(self, worker_id: str, blocks: Iterable[int] | None = None) -> None:
        """Drop every index entry of ``worker_id`` at once (its epoch is retired).

        ``blocks``: the blocks the worker's current epoch holds, when the caller knows them
        (an updater's mirror); they are deleted now. Otherwise the retired epoch's members
        stay in Redis, uncounted, until :meth:`purge_dead` sweeps them.
        """
        _check_worker_id(worker_id)
        retired = await self._retire([worker_id])
        await self.redis.delete(self.count_key(worker_id))
        cid = retired.get(worker_id)
        if cid is None or blocks is None:
            return
        by_key: dict[str, list[str]] = {}
        for h in blocks:
            by_key.setdefault(self.block_key(h), []).append(f"{h:016x}{cid}")
        if not by_key:
            return
        keys = list(by_key.items())
        for start in range(0, len(keys), self.clear_chunk):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, members in keys[start:start + self.clear_chunk]:
                    pipe.zrem(key, *members)
                await pipe.execute()

    async def purge_dead(self) -> list[str]:
        """Retire the epochs of indexed workers whose alive key is gone, sweep retired epochs'
        members out of the buckets, and return the ids of the workers retired now."""
        indexed = [_text(w) for w in await self.redis.hkeys(self.ids_key)]
        dead: list[str] = []
        if indexed:
            async with self.redis.pipeline(transaction=False) as pipe:
                for w in indexed:
                    pipe.exists(self.alive_key(w))
                alive = await pipe.execute()
            dead = [w for w, a in zip(indexed, alive) if not a]
        if dead:
            await self._retire(dead)
            async with self.redis.pipeline(transaction=False) as pipe:
                for w in dead:
                    pipe.delete(self.count_key(w))
                await pipe.execute()
            logger.info("retired prefix-index entries of dead workers: %s", dead)
        await self.sweep()
        return dead

    async def sweep(self) -> int:
        """Remove the members of every retired epoch from the buckets; returns how many.

        One SCAN over every primary; buckets are read and cleaned ``clear_chunk`` at a time
        (two pipelines). Epochs retired while the sweep runs wait for the next one.
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
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.zrange(key, 0, -1)
                contents = await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, members in zip(batch, contents):
                    gone = [m for m in members if _text(m)[16:] in dead]
                    for i in range(0, len(gone), self.max_ops_per_call):
                        pipe.zrem(key, *gone[i:i + self.max_ops_per_call])
                    removed += len(gone)
                await pipe.execute()
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
            worker_ids = sorted(_text(w) for w in await self.redis.smembers(self.workers_key))
        if self.clustered:
            return await self._lookup_cluster(block_hashes, worker_ids)
        names = list(dict.fromkeys(worker_ids))
        keys = [self.ids_key, *[self.alive_key(w) for w in names],
                *[self.block_key(h) for h in block_hashes]]
        hexes = "".join([f"{h:016x}" for h in block_hashes])
        flat = await self._lookup_script(keys=keys, args=[len(names), *names, hexes])
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def _lookup_cluster(self, block_hashes: Sequence[int], worker_ids: Sequence[str]
                              ) -> dict[str, int]:
        names = list(dict.fromkeys(worker_ids))
        sent = time.monotonic()
        cache_s = self.liveness_cache_s
        check = [w for w in names if self._lease.get(w, 0.0) <= sent] if cache_s > 0 else names
        hexes = [f"{h:016x}" for h in block_hashes]
        cmds: list[tuple] = [("GET", self.ver_key)]
        op = "PTTL" if cache_s > 0 else "EXISTS"
        cmds.extend((op, self.alive_key(w)) for w in check)
        cmds.extend(("ZRANGEBYLEX", self.block_key(h), "(" + hx, "(" + hx + ":")
                    for h, hx in zip(block_hashes, hexes))
        res = await self._per_node(cmds)
        ver, states, holders = res[0], res[1:1 + len(check)], res[1 + len(check):]
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

    async def _per_node(self, cmds: list[tuple], writes: bool = False) -> list[Any]:
        """Run idempotent single-key commands on a cluster in one round trip per node, in parallel.

        The slot map of the cluster client routes them, and each node's share goes out as one
        plain pipeline (much less client CPU than redis-py's cluster pipeline). On any error
        (a MOVED after a failover, a node away) the cluster pipeline runs them instead: it
        follows redirections and refreshes the slot map. For ``writes``, a lost connection is
        raised instead (after a primary's crash its writer must rebuild under a new epoch: the
        promoted replica may lack acknowledged writes or keep removed members).
        """
        rc = self.redis
        try:
            groups: dict[str, list[int]] = {}
            for i, c in enumerate(cmds):
                groups.setdefault(rc.get_node_from_key(c[1]).name, []).append(i)
            out: list[Any] = [None] * len(cmds)

            async def run(name: str, idxs: list[int]) -> None:
                client = self._node_clients.get(name)
                if client is None:
                    host, port = name.rsplit(":", 1)
                    client = self._node_clients[name] = aioredis.Redis(
                        host=host, port=int(port), **self._node_kwargs())
                async with client.pipeline(transaction=False) as pipe:
                    for i in idxs:
                        pipe.execute_command(*cmds[i])
                    for i, v in zip(idxs, await pipe.execute()):
                        out[i] = v

            await asyncio.gather(*[run(n, ix) for n, ix in groups.items()])
            return out
        except Exception as exc:
            logger.debug("per-node pipeline failed; using the cluster pipeline", exc_info=True)
            for c in self._node_clients.values():
                await c.aclose()
            self._node_clients.clear()
            if writes and isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
                raise
        async with rc.pipeline(transaction=False) as pipe:
            for c in cmds:
                pipe.execute_command(*c)
            return await pipe.execute()

    def _node_kwargs(self) -> dict[str, Any]:
        """Connection settings of the cluster client, for its per-node plain clients."""
        kw = self.redis.get_connection_kwargs()
        keep = ("username", "password", "socket_timeout", "socket_connect_timeout",
                "decode_responses", "encoding", "ssl", "ssl_ca_certs", "ssl_certfile",
                "ssl_keyfile", "retry", "health_check_interval")
        return {k: kw[k] for k in keep if k in kw}

    async def aclose(self) -> None:
        """Close the per-node connections a cluster lookup opened (the client is the caller's)."""
        for c in self._node_clients.values():
            await c.aclose()
        self._node_clients.clear()

    async def worker_block_count(self, worker_id: str) -> int:
        """How many blocks the index attributes to ``worker_id``'s current epoch."""
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
