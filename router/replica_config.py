"""Settings of a gateway's local replica of the prefix index (router/index_replica.py)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class IndexReplicaConfig(BaseModel):
    """How a replica follows the index's change logs and how stale it may be used."""

    max_staleness_s: float = Field(1.0, gt=0, description=(
        "a lookup trusts a partition of the replica only while its change log was read to "
        "the end by a read sent at most this long ago; blocks of a partition that is not (a "
        "connection lost, a failover, a warm-up) end the prefix there (the replica "
        "under-reports). So a block removed longer ago than this is never reported"))
    block_ms: int = Field(100, ge=1, description=(
        "longest wait of one blocking read of a change log (XREAD BLOCK); kept below the "
        "client's socket timeout"))
    read_interval_ms: int = Field(10, ge=0, description=(
        "after a read that returned changes, wait until this long after it was sent before "
        "the next one: each read then carries many changes (much less CPU here and on the "
        "shards per change), for at most this much more lag"))
    read_count: int = Field(2000, ge=1, description=(
        "log entries one read returns at most; at most the index's log_maxlen"))
    warm_chunk: int = Field(1000, ge=1, description=(
        "buckets read per pipeline while warming from Redis"))
    retry_s: float = Field(0.2, gt=0, description=(
        "wait before reading a change log again after an error"))
    lag_samples: int = Field(20_000, ge=1, description=(
        "how many recent replica lag samples (a change's write to its application here) "
        "are kept for percentiles"))


class RegistryFeedConfig(BaseModel):
    """How a gateway follows the worker registry's change log (router/registry_feed.py)."""

    max_staleness_s: float = Field(2.0, gt=0, description=(
        "the feed counts as synced while its last complete read of the log was sent at most "
        "this long ago; a gateway polls the registry instead while it is not"))
    block_ms: int = Field(200, ge=1, description=(
        "longest wait of one blocking read of the log (XREAD BLOCK); kept below the client's "
        "socket timeout"))
    read_count: int = Field(1000, ge=1, description="log entries one read returns at most")
    retry_s: float = Field(0.2, gt=0, description="wait before reading again after an error")
