"""The single-Redis prefix index as it was before the Redis Cluster layout (commit 71652d0, the
reverse SET per block + forward SET per worker, one Lua lookup building key names):
the baseline `python -m bench.index_scale` measures against, in the same run. Not used in
production."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Final

import redis.asyncio as aioredis

from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.registry import DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)

__all__ = ["LegacyPrefixIndex"]

# ARGV: ns, worker_id, op... where op = "+<h>" (stored) or "-<h>" (removed), applied in order.
# Returns {stored_new, removed_present}.
_APPLY_LUA: Final = """
local ns, w = ARGV[1], ARGV[2]
local fwd = ns .. ':kv:worker:' .. w
local bpre = ns .. ':kv:block:'
redis.call('SADD', ns .. ':kv:indexed', w)
local added, removed = 0, 0
for i = 3, #ARGV do
  local a = ARGV[i]
  local h = string.sub(a, 2)
  if string.byte(a, 1) == 43 then
    added = added + redis.call('SADD', fwd, h)
    redis.call('SADD', bpre .. h, w)
  else
    removed = removed + redis.call('SREM', fwd, h)
    redis.call('SREM', bpre .. h, w)
  end
end
return {added, removed}
"""

# ARGV: ns, worker_id, chunk. Drops up to `chunk` of the worker's blocks; returns how many are left.
_CLEAR_CHUNK_LUA: Final = """
local ns, w = ARGV[1], ARGV[2]
local fwd = ns .. ':kv:worker:' .. w
local bpre = ns .. ':kv:block:'
local hs = redis.call('SPOP', fwd, tonumber(ARGV[3]))
for _, h in ipairs(hs) do
  redis.call('SREM', bpre .. h, w)
end
local left = redis.call('SCARD', fwd)
if left == 0 then
  redis.call('SREM', ns .. ':kv:indexed', w)
end
return left
"""

# ARGV: ns, n_workers (-1 = every member of {ns}:workers), worker ids..., block hashes (hex)...
# Returns a flat array {worker_id, prefix_blocks, ...} for every live candidate worker.
_LOOKUP_LUA: Final = """
local ns = ARGV[1]
local nw = tonumber(ARGV[2])
local workers
local first
if nw < 0 then
  workers = redis.call('SMEMBERS', ns .. ':workers')
  first = 3
else
  workers = {}
  for i = 1, nw do workers[i] = ARGV[2 + i] end
  first = 3 + nw
end
local depth = {}
local order = {}
local active = {}
local nactive = 0
for _, w in ipairs(workers) do
  if depth[w] == nil and redis.call('EXISTS', ns .. ':worker:' .. w .. ':alive') == 1 then
    depth[w] = 0
    order[#order + 1] = w
    active[w] = true
    nactive = nactive + 1
  end
end
local bpre = ns .. ':kv:block:'
-- The prompt's block hashes arrive as ONE argument: 16 hex digits each, concatenated (one
-- argument instead of one per block keeps the client's command encoding cheap).
local hexes = ARGV[first] or ''
local nblocks = math.floor(#hexes / 16)
local n = 0
while nactive > 0 and n < nblocks do
  n = n + 1
  local holders = redis.call('SMEMBERS', bpre .. string.sub(hexes, n * 16 - 15, n * 16))
  local still = {}
  local cnt = 0
  for _, w in ipairs(holders) do
    if active[w] then
      still[w] = true
      cnt = cnt + 1
      depth[w] = n
    end
  end
  active = still
  nactive = cnt
end
local out = {}
for _, w in ipairs(order) do
  out[#out + 1] = w
  out[#out + 1] = depth[w]
end
return out
"""


def hash_hex(block_hash: int) -> str:
    """The 16-hex-digit member/key form of a published 64-bit block hash."""
    return f"{block_hash:016x}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LegacyPrefixIndex:
    """Per-worker block membership in Redis with one-round-trip longest-prefix lookups."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        max_ops_per_call: int = 4096,
        clear_chunk: int = 2048,
    ) -> None:
        """Use ``redis`` (any ``decode_responses``) under key prefix ``namespace``.

        ``max_ops_per_call`` bounds the block operations in one apply script call and
        ``clear_chunk`` the blocks dropped per clear script call, so no script blocks Redis long.
        """
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"invalid namespace {namespace!r}")
        self.redis = redis
        self.namespace = namespace
        self.max_ops_per_call = max_ops_per_call
        self.clear_chunk = clear_chunk
        self._apply_script = redis.register_script(_APPLY_LUA)
        self._clear_script = redis.register_script(_CLEAR_CHUNK_LUA)
        self._lookup_script = redis.register_script(_LOOKUP_LUA)

    # -- keyspace ------------------------------------------------------------------------------

    def block_key(self, block_hash: int) -> str:
        """Key of the set of workers holding ``block_hash``."""
        return f"{self.namespace}:kv:block:{hash_hex(block_hash)}"

    def worker_blocks_key(self, worker_id: str) -> str:
        """Key of the set of block hashes (hex) held by ``worker_id``."""
        return f"{self.namespace}:kv:worker:{worker_id}"

    @property
    def indexed_key(self) -> str:
        """Key of the set of worker ids that currently have index entries."""
        return f"{self.namespace}:kv:indexed"

    def alive_key(self, worker_id: str) -> str:
        """The registry's liveness key of ``worker_id`` (read only here)."""
        return f"{self.namespace}:worker:{worker_id}:alive"

    @property
    def workers_key(self) -> str:
        """The registry's set of known worker ids (read only here)."""
        return f"{self.namespace}:workers"

    # -- writes ----------------------------------------------------------------------------------

    async def apply(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        """Apply one engine's events, in order: BlockStored adds, BlockRemoved drops, AllBlocksCleared clears."""
        _check_worker_id(worker_id)
        ops: list[str] = []
        for event in events:
            if isinstance(event, BlockStored):
                ops.extend(["+" + hash_hex(h) for h in event.block_hashes])  # type: ignore[arg-type]
            elif isinstance(event, BlockRemoved):
                ops.extend(["-" + hash_hex(h) for h in event.block_hashes])  # type: ignore[arg-type]
            elif isinstance(event, AllBlocksCleared):
                ops.clear()  # everything before the clear is moot
                await self.clear_worker(worker_id)
        await self._apply_ops(worker_id, ops)

    async def _apply_ops(self, worker_id: str, ops: list[str]) -> None:
        if not ops:
            return
        step = self.max_ops_per_call
        for start in range(0, len(ops), step):
            await self._apply_script(args=[self.namespace, worker_id, *ops[start : start + step]])

    async def add_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``worker_id`` holds ``block_hashes`` (as a BlockStored would)."""
        _check_worker_id(worker_id)
        await self._apply_ops(worker_id, ["+" + hash_hex(h) for h in block_hashes])

    async def clear_worker(self, worker_id: str) -> None:
        """Drop every index entry of ``worker_id`` (in chunks, so Redis is never blocked long)."""
        _check_worker_id(worker_id)
        while int(await self._clear_script(args=[self.namespace, worker_id, self.clear_chunk])) > 0:
            pass

    async def purge_dead(self) -> list[str]:
        """Clear the entries of every indexed worker whose alive key is gone; return their ids."""
        indexed = [_text(w) for w in await self.redis.smembers(self.indexed_key)]
        if not indexed:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for w in indexed:
                pipe.exists(self.alive_key(w))
            alive = await pipe.execute()
        dead = [w for w, a in zip(indexed, alive) if not a]
        for w in dead:
            await self.clear_worker(w)
        if dead:
            logger.info("purged prefix-index entries of dead workers: %s", dead)
        return dead

    # -- reads -----------------------------------------------------------------------------------

    async def longest_prefixes(
        self, block_hashes: Sequence[int], worker_ids: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Longest cached prefix (in blocks, from the first) of every live worker, in ONE round trip.

        ``worker_ids=None`` considers every worker in the registry set; otherwise only those given.
        Workers whose alive key does not exist are left out; live workers with no match map to 0.
        """
        if worker_ids is None:
            head: list[str | int] = [self.namespace, -1]
        else:
            head = [self.namespace, len(worker_ids), *worker_ids]
        hexes = "".join([f"{h:016x}" for h in block_hashes])
        flat = await self._lookup_script(args=[*head, hexes])
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def worker_block_count(self, worker_id: str) -> int:
        """How many blocks the index attributes to ``worker_id``."""
        return int(await self.redis.scard(self.worker_blocks_key(worker_id)))

    async def workers_holding(self, block_hash: int) -> set[str]:
        """Worker ids (live or not) the index says hold ``block_hash``."""
        return {_text(w) for w in await self.redis.smembers(self.block_key(block_hash))}


def _check_worker_id(worker_id: str) -> None:
    if not worker_id or not isinstance(worker_id, str):
        raise ValueError(f"invalid worker id {worker_id!r}")
