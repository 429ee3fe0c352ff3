"""Cluster-level gauges a gateway exports: live workers per role (its registry snapshot) and
the pool sizes the controller publishes in Redis (services/controller/pool_sizes.py), refreshed
before each scrape of /metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.registry import WorkerRole
from services.controller.pool_sizes import PoolObservation, PoolSizes
from services.gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from router.redis_client import RedisHealth

    from services.gateway.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)


class ClusterGauges:
    """Live workers and pool sizes, in a gateway's metrics registry."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.live_workers = metrics.live_workers
        self.pools = PoolCollector()
        metrics.registry.register(self.pools)

    async def observe(self, directory: "WorkerDirectory | None", redis: "Redis | None",
                      namespace: str, health: "RedisHealth | None" = None) -> None:
        """Refresh: live workers per role from the registry snapshot, desired/observed pool
        sizes from Redis (through `health`, if given). With Redis away the last figures stay
        (their age grows)."""
        if directory is not None:
            for role in WorkerRole:
                self.live_workers.labels(role.value).set(len(directory.by_role(role)))
        if redis is None:
            return
        try:
            sizes = PoolSizes(redis, namespace)
            if health is None:
                desired = await sizes.desired()
                observed, updated_at = await sizes.observed()
            else:  # bounded, and not tried while Redis is known to be away
                desired = await health.call(sizes.desired)
                observed, updated_at = await health.call(sizes.observed)
        except Exception as exc:
            log.warning("could not read pool sizes: %s", exc)
            return
        self.pools.update(desired, observed, updated_at)


class PoolCollector(Collector):
    """splitserve_pool_* families: the pool sizes the controller publishes in Redis."""

    def __init__(self) -> None:
        self.desired: dict[str, int] = {}
        self.observed: dict[str, PoolObservation] = {}
        self.updated_at = 0.0

    def update(self, desired: dict[str, int], observed: dict[str, PoolObservation],
               updated_at: float) -> None:
        self.desired, self.observed, self.updated_at = desired, observed, updated_at

    def collect(self) -> Iterator[Metric]:
        desired = GaugeMetricFamily("splitserve_pool_desired_replicas",
                                    "Replicas the controller is asked to run, by pool",
                                    labels=["pool"])
        for pool, n in sorted(self.desired.items()):
            desired.add_metric([pool], n)
        yield desired
        families = {
            "serving": GaugeMetricFamily(
                "splitserve_pool_serving_replicas",
                "Workers registered and alive, by pool (controller's view)", labels=["pool"]),
            "starting": GaugeMetricFamily("splitserve_pool_starting_replicas",
                                          "Workers whose engine is loading, by pool",
                                          labels=["pool"]),
            "draining": GaugeMetricFamily(
                "splitserve_pool_draining_replicas",
                "Workers finishing their requests before exit, by pool", labels=["pool"]),
        }
        restarts = CounterMetricFamily("splitserve_pool_restarts",
                                       "Workers the controller replaced since it started, by pool",
                                       labels=["pool"])
        for pool, obs in sorted(self.observed.items()):
            for field, family in families.items():
                family.add_metric([pool], getattr(obs, field))
            restarts.add_metric([pool], obs.restarts)
        yield from families.values()
        yield restarts
        age = GaugeMetricFamily("splitserve_pool_observed_age_seconds",
                                "Seconds since the controller last published pool sizes")
        if self.updated_at:
            age.add_metric([], max(0.0, time.time() - self.updated_at))
        yield age
