"""Filters of the routing pipeline (router/plugins.py): drop candidates that must not serve a
request (when a filter would drop every candidate, the pipeline keeps them all)."""

from __future__ import annotations

from router.plugins import Candidate, RouteContext


class KVHeadroomFilter:
    """Drops workers whose KV cache is fuller than `max_usage` (0..1): past it, a new request
    evicts cached prefixes other requests are routed for, or gets preempted."""

    name = "kv_headroom"

    def __init__(self, max_usage: float = 1.0) -> None:
        self.max_usage = max_usage

    def keep(self, c: Candidate, ctx: RouteContext) -> bool:
        return c.estimate.worker.load.kv_cache_usage <= self.max_usage


FILTERS: dict[str, type] = {f.name: f for f in (KVHeadroomFilter,)}
