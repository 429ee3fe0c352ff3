"""The state of one gateway process, outside vLLM's server: its Redis client, the worker
directory, the route stage, API keys, admission limits and metrics. vLLM's OpenAI server
(services/gateway/vllm_frontend.py) serves the API on top of it."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.redis_client import RedisClientConfig, RedisHealth, redis_client, stop_task
from router.replicated_index import open_prefix_index
from services.cluster_secret import ClusterSecret
from services.gateway.admission import Admission
from services.gateway.auth import ApiKeys
from services.gateway.cluster_metrics import ClusterGauges
from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.replica_metrics import ReplicaCollector
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from services.gateway.metrics_listener import MetricsListener

log = logging.getLogger(__name__)


class Gateway:
    """One gateway's state; `start()` connects it to the cluster, `stop()` lets go."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.api_keys = ApiKeys.load(cfg.api_keys_file, cfg.api_keys_env)
        self.secret = ClusterSecret.required("the gateway")  # its credential with workers
        self.metrics = GatewayMetrics(cfg.route_audit_window)
        self.cluster_gauges = ClusterGauges(self.metrics)
        self.metrics.registry.register(ReplicaCollector(
            lambda: self.route_stage.index if self.route_stage is not None else None,
            lambda: self.directory.feed if self.directory is not None else None))
        self.admission = Admission(cfg.max_in_flight, cfg.max_in_flight_per_client)
        self.redis: Redis | None = None
        self.directory: WorkerDirectory | None = None
        self.route_stage: RouteStage | None = None
        self._purge_task: asyncio.Task | None = None

    async def start(self) -> None:
        redis_cfg = RedisClientConfig()
        self.redis = redis_client(self.cfg.redis_url, redis_cfg)
        self.directory = WorkerDirectory(self.redis, self.cfg.namespace, self.cfg.name,
                                         self.secret, self.cfg.worker_refresh_s,
                                         health=RedisHealth.from_config(redis_cfg),
                                         feed=self.cfg.registry_feed)
        try:
            await self.directory.refresh()
        except Exception:
            log.warning("registry not reachable at start; will keep trying", exc_info=True)
        await self.directory.start()
        policy = make_policy(self.cfg.policy, self.cfg.kv_policy)
        index = (await open_prefix_index(self.redis, self.cfg.namespace, self.cfg.index_replica)
                 if policy.uses_prefix_index else None)
        self.route_stage = RouteStage(self.directory, policy, index, self.metrics,
                                      self.cfg.migration, self.cfg.hash_cache_blocks)
        if index is not None:
            self._purge_task = asyncio.create_task(self._purge_dead_workers(index))

    async def _purge_dead_workers(self, index: PrefixIndex) -> None:
        """Delete the index entries of workers whose liveness expired. Lookups ignore them
        already; this only reclaims Redis memory (idempotent: any gateway may do it)."""
        while True:
            await asyncio.sleep(self.cfg.index_purge_interval_s)
            try:
                if purged := await index.purge_dead():
                    log.info("purged index entries of dead workers %s", purged)
            except Exception:
                log.warning("index purge failed; will retry", exc_info=True)

    async def can_route(self) -> bool:
        """Whether a request can be routed now, or once the healing pools bring a worker up
        within `migration.route_wait_s` (RouteStage.can_route)."""
        return self.route_stage is not None and await self.route_stage.can_route()

    @property
    def serving(self) -> bool:
        """Whether a decode-capable worker serves now (without a prefill worker the decode
        worker computes prompts itself)."""
        return self.directory is not None and self.directory.can_decode

    async def refresh_gauges(self) -> None:
        """Before a scrape: the cluster gauges (live workers, pool sizes from Redis)."""
        d = self.directory
        await self.cluster_gauges.observe(d, self.redis, self.cfg.namespace,
                                          d.health if d else None)

    def metrics_listener(self, registry: "CollectorRegistry") -> "MetricsListener | None":
        """The listener of `registry` on cfg.metrics_port (None when it is 0)."""
        if not self.cfg.metrics_port:
            return None
        from services.gateway.metrics_listener import MetricsListener

        return MetricsListener(registry, self.cfg.host, self.cfg.metrics_port,
                               self.refresh_gauges)

    async def stop(self) -> None:
        if self._purge_task is not None:
            await stop_task(self._purge_task)
        if self.route_stage is not None and self.route_stage.index is not None:
            await self.route_stage.index.aclose()  # a replica's follower and connections
        if self.directory:
            await self.directory.stop()
        if self.redis:
            await self.redis.aclose()
