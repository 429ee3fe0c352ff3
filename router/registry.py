"""The worker registry in Redis: who is serving, where, in which role, and how loaded.

Keyspace (``ns`` is the cluster's namespace, default ``splitserve``):

- ``{ns}:workers``                  set of every worker id ever registered (pruned lazily)
- ``{ns}:worker:{id}``              hash: the worker's static info and its latest load figures
- ``{ns}:worker:{id}:alive``        liveness key with a TTL, refreshed by the worker's heartbeat
- ``{ns}:workers:log``              stream of changes, written in the same transaction as the
  keys: ``o=r`` registered (``i``: the info as JSON), ``o=h`` heartbeat (``l``: the load as
  JSON, ``s``: state), ``o=s`` state (``s``), ``o=d`` deregistered; ``w`` the worker id and
  ``t`` the liveness TTL (ms) in each. A heartbeat is logged when the worker's load or state
  changed since the one this process logged last, and at least every ``ttl_s / 3``

A worker counts only while its liveness key exists: when a worker dies its key expires within
``ttl_s`` and every reader stops seeing it, with no clean-up needed first. Readers get all live
workers in one round trip (a server-side Lua script), which also prunes ids whose info is gone;
or follow the log (router/registry_feed.py): changes pushed, no snapshot polled.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from typing import Any, Sequence

from pydantic import BaseModel, Field
from redis.asyncio import Redis

DEFAULT_NAMESPACE = "splitserve"


class WorkerRole(str, Enum):
    """What a worker's engine does in the request path."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class WorkerLoad(BaseModel):
    """Load figures a worker publishes with each heartbeat."""

    in_flight: int = Field(0, description="requests its API has accepted and not yet answered")
    num_running_reqs: int = Field(0, description="engine scheduler: running requests")
    num_waiting_reqs: int = Field(0, description="engine scheduler: waiting requests")
    kv_cache_usage: float = Field(0.0, description="engine: fraction of KV blocks in use (0..1)")
    pending_prefill_reqs: int = Field(0, description=(
        "requests waiting for their first token that compute their prompt here"))
    pending_prompt_tokens: int = Field(0, description=(
        "prompt tokens of those requests (cached part included: the engine reports a cache hit "
        "only once the prefill is done)"))
    decoding_reqs: int = Field(0, description="requests past their first token (running batch)")
    prefill_tokens_per_s: float = Field(0.0, description=(
        "measured prefill speed: prompt tokens computed per second of prefill work (0: not "
        "measured yet)"))
    step_s: float = Field(0.0, description=(
        "measured engine step time with no prefill in it, fixed part (0: not measured yet)"))
    step_per_seq_s: float = Field(0.0, description=(
        "measured engine step time added by each decoding request"))
    remote_kv_wait_s: float = Field(0.0, description=(
        "decode workers: measured time from a remotely prefilled request's arrival to its "
        "first token (KV pull + first step; 0: not measured yet)"))
    updated_at: float = Field(0.0, description="unix time of this snapshot")


class WorkerState(str, Enum):
    """Whether a worker takes new requests."""

    SERVING = "serving"
    DRAINING = "draining"


class WorkerInfo(BaseModel):
    """A worker as the registry knows it."""

    worker_id: str = Field(description="unique id, also the engine's NIXL engine id")
    role: WorkerRole = Field(description="prefill, decode or both")
    address: str = Field(description="host:port of its gRPC worker API (Health, Stats)")
    link_address: str = Field("", description=(
        "host:port of its engine link (services/link.py: vLLM engine-core requests and "
        "outputs); empty: none"))
    model: str = Field(description="served model name")
    metrics_url: str = Field("", description="its Prometheus endpoint (vLLM's and ours)")
    block_size: int = Field(16, description="engine KV block size in tokens")
    hash_algo: str = Field("sha256", description="engine prefix-cache hash algorithm")
    hash_seed: str = Field("0", description="engine PYTHONHASHSEED (seeds NONE_HASH)")
    pid: int = Field(0, description="process id of the worker (the Ray actor)")
    node: str = Field("", description="host name / Ray node the worker runs on")
    placement_group: str = Field("", description="id of the Ray placement group it runs in")
    ray_resources: str = Field("", description="Ray resources assigned to it (JSON)")
    started_at: float = Field(0.0, description="unix time the worker registered")
    state: WorkerState = Field(WorkerState.SERVING, description=(
        "serving, or draining: finishing its requests, takes no new ones"))
    load: WorkerLoad = Field(default_factory=WorkerLoad, description="latest published load")

    def to_redis(self) -> dict[str, str]:
        """Flatten to a Redis hash."""
        flat = self.model_dump(mode="json", exclude={"load"})
        flat.update({f"load.{k}": v for k, v in self.load.model_dump(mode="json").items()})
        return {k: str(v) for k, v in flat.items()}

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> "WorkerInfo":
        """Rebuild from a Redis hash written by :meth:`to_redis`."""
        load = {k.removeprefix("load."): v for k, v in raw.items() if k.startswith("load.")}
        rest = {k: v for k, v in raw.items() if not k.startswith("load.")}
        return cls.model_validate({**rest, "load": load})


# Returns [id, flat-hash-array, id, flat-hash-array, ...] for every worker whose alive key
# exists; ids whose info hash is gone are removed from the set.
_LIVE_WORKERS_LUA = """
local ns = ARGV[1]
local out = {}
local ids = redis.call('SMEMBERS', ns .. ':workers')
for _, id in ipairs(ids) do
  local key = ns .. ':worker:' .. id
  if redis.call('EXISTS', key .. ':alive') == 1 then
    local h = redis.call('HGETALL', key)
    if #h > 0 then
      table.insert(out, id)
      table.insert(out, h)
    end
  elseif redis.call('EXISTS', key) == 0 then
    redis.call('SREM', ns .. ':workers', id)
  end
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


class WorkerRegistry:
    """Registers workers, refreshes their liveness and load, and lists the live ones."""

    def __init__(self, redis: Redis, namespace: str = DEFAULT_NAMESPACE, ttl_s: float = 5.0,
                 log_maxlen: int = 20_000):
        self.redis = redis
        self.ns = namespace
        self.ttl_ms = int(ttl_s * 1000)
        self.log_maxlen = log_maxlen
        self._live_script = redis.register_script(_LIVE_WORKERS_LUA)
        # worker -> (load and state as last logged, less the snapshot time; when)
        self._logged: dict[str, tuple[str, float]] = {}

    @property
    def log_key(self) -> str:
        """The stream of registry changes."""
        return f"{self.ns}:workers:log"

    def _log(self, pipe: Any, worker_id: str, op: str, **fields: str) -> None:
        pipe.xadd(self.log_key, {"o": op, "w": worker_id, "t": str(self.ttl_ms), **fields},
                  maxlen=self.log_maxlen, approximate=True)

    def _key(self, worker_id: str) -> str:
        return f"{self.ns}:worker:{worker_id}"

    async def register(self, info: WorkerInfo) -> None:
        """Publish a worker's info and mark it alive."""
        key = self._key(info.worker_id)
        flat = info.to_redis()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=flat)
            pipe.sadd(f"{self.ns}:workers", info.worker_id)
            pipe.set(f"{key}:alive", "1", px=self.ttl_ms)
            self._log(pipe, info.worker_id, "r", i=json.dumps(flat))
            await pipe.execute()
        self._logged[info.worker_id] = (self._signature(info), time.monotonic())

    @staticmethod
    def _signature(info: WorkerInfo) -> str:
        return info.load.model_dump_json(exclude={"updated_at"}) + info.state.value

    async def heartbeat(self, info: WorkerInfo) -> bool:
        """Refresh a worker's liveness and publish its load (``info.load``) and state.

        If Redis lost the worker's entry (a restart without persistence, a flush), the whole
        entry is written again. Returns False in that case, True otherwise.
        """
        key = self._key(info.worker_id)
        mapping = {f"load.{k}": str(v) for k, v in info.load.model_dump(mode="json").items()}
        mapping["state"] = info.state.value
        sig = self._signature(info)
        now_m = time.monotonic()
        last = self._logged.get(info.worker_id)
        log = last is None or last[0] != sig or now_m - last[1] >= self.ttl_ms / 3000
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hexists(key, "worker_id")
            pipe.hset(key, mapping=mapping)
            pipe.set(f"{key}:alive", "1", px=self.ttl_ms)
            if log:
                self._log(pipe, info.worker_id, "h", l=info.load.model_dump_json(),
                          s=info.state.value)
            known, *_ = await pipe.execute()
        if not known:
            await self.register(info)
        elif log:
            self._logged[info.worker_id] = (sig, now_m)
        return bool(known)

    async def set_state(self, worker_id: str, state: WorkerState) -> None:
        """Publish a state change at once."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(worker_id), "state", state.value)
            self._log(pipe, worker_id, "s", s=state.value)
            await pipe.execute()
        self._logged.pop(worker_id, None)  # the next heartbeat is logged

    async def deregister(self, worker_id: str) -> None:
        """Remove a worker at once (clean shutdown or drain)."""
        key = self._key(worker_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{key}:alive", key)
            pipe.srem(f"{self.ns}:workers", worker_id)
            self._log(pipe, worker_id, "d")
            await pipe.execute()
        self._logged.pop(worker_id, None)

    async def live_workers(self, roles: Sequence[WorkerRole] | None = None) -> list[WorkerInfo]:
        """Every live worker (optionally of the given roles), in one round trip."""
        flat = await self._live_script(args=[self.ns])
        workers: list[WorkerInfo] = []
        for i in range(0, len(flat), 2):
            pairs = flat[i + 1]
            raw = {_text(pairs[j]): _text(pairs[j + 1]) for j in range(0, len(pairs), 2)}
            info = WorkerInfo.from_redis(raw)
            if roles is None or info.role in roles:
                workers.append(info)
        workers.sort(key=lambda w: w.worker_id)
        return workers


def now() -> float:
    """Unix time, for load snapshots."""
    return time.time()
