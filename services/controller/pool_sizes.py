"""Desired and observed pool sizes in Redis: the contract between controller, CLI and planner.

Keyspace (``ns`` is the cluster's namespace):

- ``{ns}:pools:desired``   hash pool -> replicas wanted (written by `splitserve scale`, the
                           planner, and by the controller at start-up from its config)
- ``{ns}:pools:observed``  hash pool -> replicas serving now, plus ``{pool}.starting``,
                           ``{pool}.draining``, ``{pool}.restarts`` and ``updated_at``
                           (written by the controller after every reconcile pass)
- ``{ns}:pools:events``    stream of scale changes (who asked for what, when), capped

Pools are named by worker role: ``prefill``, ``decode`` (disaggregated) or ``both``
(aggregated). The controller reconciles the running actors to the desired sizes.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

POOLS = ("prefill", "decode", "both")
#: The largest pool `splitserve scale`, the planner and the controller accept (a fleet of
#: 1,000 engines and ten times that; the router scores no pool as a whole: router/shortlist.py).
MAX_REPLICAS = 10_000


class PoolObservation(BaseModel):
    """What the controller sees of one pool."""

    serving: int = Field(0, description="workers registered and alive")
    starting: int = Field(0, description="workers whose engine is loading")
    draining: int = Field(0, description="workers finishing their requests before exit")
    restarts: int = Field(0, description="workers replaced since the controller started")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


class PoolSizes:
    """Reads and writes the desired and observed sizes of a cluster's pools."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.ns = namespace

    @property
    def desired_key(self) -> str:
        return f"{self.ns}:pools:desired"

    @property
    def observed_key(self) -> str:
        return f"{self.ns}:pools:observed"

    @property
    def events_key(self) -> str:
        return f"{self.ns}:pools:events"

    @staticmethod
    def check(pool: str, replicas: int) -> None:
        """Raise ValueError for an unknown pool or an impossible size."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; pools are {', '.join(POOLS)}")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise ValueError(f"replicas must be an integer, got {replicas!r}")
        if replicas < 0 or replicas > MAX_REPLICAS:
            raise ValueError(f"replicas must be between 0 and {MAX_REPLICAS}, got {replicas}")

    async def set_desired(self, sizes: dict[str, int], by: str) -> None:
        """Set the desired replicas of one or more pools (atomically), recording who asked."""
        for pool, n in sizes.items():
            self.check(pool, n)
        if not sizes:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.desired_key, mapping={p: str(n) for p, n in sizes.items()})
            pipe.xadd(self.events_key, {"by": by, "at": f"{time.time():.3f}",
                                        **{p: str(n) for p, n in sizes.items()}},
                      maxlen=1000, approximate=True)
            await pipe.execute()

    async def init_desired(self, sizes: dict[str, int], by: str = "controller") -> dict[str, int]:
        """Set desired sizes only for pools that have none yet; returns the desired sizes."""
        for pool, n in sizes.items():
            self.check(pool, n)
        async with self.redis.pipeline(transaction=True) as pipe:
            for pool, n in sizes.items():
                pipe.hsetnx(self.desired_key, pool, str(n))
            await pipe.execute()
        return await self.desired()

    async def desired(self) -> dict[str, int]:
        """Desired replicas per pool (only pools that have a desired size)."""
        raw = await self.redis.hgetall(self.desired_key)
        out: dict[str, int] = {}
        for k, v in raw.items():
            try:
                out[_text(k)] = int(_text(v))
            except ValueError:
                continue  # a malformed value is ignored, not fatal
        return out

    async def publish_observed(self, observed: dict[str, PoolObservation]) -> None:
        """Record what the controller sees (after each reconcile pass)."""
        mapping: dict[str, str] = {"updated_at": f"{time.time():.3f}"}
        for pool, obs in observed.items():
            mapping[pool] = str(obs.serving)
            mapping[f"{pool}.starting"] = str(obs.starting)
            mapping[f"{pool}.draining"] = str(obs.draining)
            mapping[f"{pool}.restarts"] = str(obs.restarts)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.observed_key)
            pipe.hset(self.observed_key, mapping=mapping)
            await pipe.execute()

    async def observed(self) -> tuple[dict[str, PoolObservation], float]:
        """What the controller last saw, and when (unix time; 0 if never)."""
        raw = {_text(k): _text(v) for k, v in (await self.redis.hgetall(self.observed_key)).items()}
        out: dict[str, PoolObservation] = {}
        for pool in POOLS:
            if pool in raw:
                out[pool] = PoolObservation(
                    serving=int(raw[pool]), starting=int(raw.get(f"{pool}.starting", 0)),
                    draining=int(raw.get(f"{pool}.draining", 0)),
                    restarts=int(raw.get(f"{pool}.restarts", 0)))
        return out, float(raw.get("updated_at", 0.0))

    async def clear(self) -> None:
        """Remove this cluster's pool keys (when the controller stops)."""
        await self.redis.delete(self.desired_key, self.observed_key, self.events_key)
