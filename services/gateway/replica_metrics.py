"""Prometheus families of a gateway's local replicas, read at scrape time: the prefix index's
replica (router/index_replica.py) and the registry feed (router/registry_feed.py). Only the
parts a gateway runs are exported (docs/operations.md, "Metrics")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.registry_feed import RegistryFeed
from router.replicated_index import ReplicatedPrefixIndex

LAG_QUANTILES = (0.5, 0.99)
"""Quantiles of the replica's recent lag samples exported."""


class ReplicaCollector:
    """Collects the replica and feed figures of one gateway (register it once)."""

    def __init__(self, index: Callable[[], Any], feed: Callable[[], RegistryFeed | None]) -> None:
        """``index``: the gateway's prefix index now (None, or one without a replica: no
        index families); ``feed``: its registry feed now (None: no feed families)."""
        self._index, self._feed = index, feed

    def collect(self) -> Iterator[Metric]:
        index = self._index()
        if isinstance(index, ReplicatedPrefixIndex):
            rep = index.replica
            yield GaugeMetricFamily(
                "splitserve_gateway_index_replica_synced",
                "1 while every partition of the local prefix-index replica was read to the end "
                "within max_staleness_s (lookups answered here), else 0 (lookups ask Redis)",
                value=1.0 if rep.synced() else 0.0)
            lag = GaugeMetricFamily(
                "splitserve_gateway_index_replica_lag_seconds",
                "Recent index changes: written in Redis to applied in this gateway's replica, "
                "by quantile over the last lag_samples changes", labels=["quantile"])
            for q, v in zip(LAG_QUANTILES, rep.lag_percentiles(LAG_QUANTILES)):
                if v is not None:
                    lag.add_metric([str(q)], v / 1000)
            yield lag
            yield CounterMetricFamily("splitserve_gateway_index_replica_changes",
                                      "Block changes applied to the local replica",
                                      value=rep.stats.changes)
            yield CounterMetricFamily("splitserve_gateway_index_replica_warms",
                                      "Partitions read whole from Redis (start, gaps, "
                                      "failovers)", value=rep.stats.warms)
            yield CounterMetricFamily("splitserve_gateway_index_replica_read_errors",
                                      "Failed reads of an index change log", value=rep.stats.errors)
            reads = CounterMetricFamily("splitserve_gateway_index_lookups",
                                        "Prefix lookups by where they were answered",
                                        labels=["source"])
            reads.add_metric(["replica"], index.reads.replica)
            reads.add_metric(["redis"], index.reads.redis)
            yield reads
        feed = self._feed()
        if feed is not None:
            yield GaugeMetricFamily(
                "splitserve_gateway_registry_feed_synced",
                "1 while the registry's change log was read to its end within the feed's "
                "max_staleness_s, else 0 (the registry is re-read every worker_refresh_s)",
                value=1.0 if feed.synced() else 0.0)
            yield CounterMetricFamily("splitserve_gateway_registry_feed_warms",
                                      "Registry snapshots read (start, gaps, failovers)",
                                      value=feed.warms)
