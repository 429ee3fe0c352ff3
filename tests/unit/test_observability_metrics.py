"""The worker's KV transfer metrics from vLLM's own NIXL connector stats; the gateway's pool
and live-worker gauges from a real Redis."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from router.registry import WorkerInfo, WorkerRole
from services.controller.pool_sizes import PoolObservation, PoolSizes
from services.gateway.cluster_metrics import ClusterGauges
from services.gateway.metrics import GatewayMetrics
from services.worker.metrics import WorkerMetrics
from tests.support.redis import RedisServer, redis_server


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_worker_kv_transfer_metrics_from_nixl_stats() -> None:
    """Fed with one step's stats as vLLM's NixlKVConnectorStats lays them out (per-transfer
    lists; the e2e test feeds real ones)."""
    stats = {"transfer_duration": [0.0015, 0.0025], "post_duration": [0.0001, 0.0001],
             "bytes_transferred": [65536, 131072], "num_descriptors": [4, 4],
             "num_failed_transfers": [1], "num_failed_notifications": [],
             "num_failed_handshakes": [], "num_kv_expired_reqs": [1],
             "num_notifications_after_expiry": []}
    empty = {k: [] for k in stats}
    registry = CollectorRegistry()
    m = WorkerMetrics("decode-0-ab", "decode", "tiny", registry=registry)
    m.observe_connector_stats(stats)
    m.observe_connector_stats(empty)
    got = samples(registry)
    assert got[("splitserve_worker_info", (("model", "tiny"), ("role", "decode"),
                                           ("worker_id", "decode-0-ab")))] == 1
    assert got[("splitserve_worker_kv_transfer_bytes_sum", ())] == 196608
    assert got[("splitserve_worker_kv_transfer_bytes_count", ())] == 2
    assert got[("splitserve_worker_kv_transfer_bytes_bucket", (("le", "65536.0"),))] == 1
    assert got[("splitserve_worker_kv_transfer_seconds_sum", ())] == pytest.approx(0.004)
    assert got[("splitserve_worker_kv_transfer_seconds_bucket", (("le", "0.0025"),))] == 2
    assert got[("splitserve_worker_kv_transfer_failures_total", ())] == 1
    assert got[("splitserve_worker_kv_lease_expired_total", ())] == 1
    # every refusal reason is there at 0 before the first refusal (a rate() over a series
    # that does not exist yet is no rate at all)
    for reason in ("unsigned", "forged", "expired", "replayed"):
        assert got[("splitserve_worker_kv_params_refused_total", (("reason", reason),))] == 0


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


class Directory:
    """What observe_cluster reads of a WorkerDirectory: serving workers by role."""

    def __init__(self, roles: list[WorkerRole]) -> None:
        self.workers = [WorkerInfo(worker_id=f"w{i}", role=r, address="127.0.0.1:1", model="m")
                        for i, r in enumerate(roles)]

    def by_role(self, *roles: WorkerRole) -> list[WorkerInfo]:
        return [w for w in self.workers if w.role in roles]


async def test_gateway_pool_and_worker_gauges(redis: RedisServer) -> None:
    client = Redis.from_url(redis.url)
    try:
        m = GatewayMetrics()
        gauges = ClusterGauges(m)
        directory = Directory([WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.DECODE])
        await gauges.observe(directory, client, "ns")  # type: ignore[arg-type]
        got = samples(m.registry)
        assert got[("splitserve_gateway_live_workers", (("role", "decode"),))] == 2
        assert got[("splitserve_gateway_live_workers", (("role", "both"),))] == 0
        assert not [k for k in got if k[0].startswith("splitserve_pool_")]  # none published

        sizes = PoolSizes(client, "ns")
        await sizes.set_desired({"prefill": 2, "decode": 3}, by="test")
        await sizes.publish_observed({
            "prefill": PoolObservation(serving=1, starting=1, restarts=4),
            "decode": PoolObservation(serving=3, draining=1)})
        await gauges.observe(directory, client, "ns")  # type: ignore[arg-type]
        got = samples(m.registry)
        assert got[("splitserve_pool_desired_replicas", (("pool", "prefill"),))] == 2
        assert got[("splitserve_pool_desired_replicas", (("pool", "decode"),))] == 3
        assert got[("splitserve_pool_serving_replicas", (("pool", "prefill"),))] == 1
        assert got[("splitserve_pool_starting_replicas", (("pool", "prefill"),))] == 1
        assert got[("splitserve_pool_draining_replicas", (("pool", "decode"),))] == 1
        assert got[("splitserve_pool_restarts_total", (("pool", "prefill"),))] == 4
        assert 0 <= got[("splitserve_pool_observed_age_seconds", ())] < 5

        # Redis away: the last figures stay (and their age grows), the scrape still works.
        await client.aclose()
        redis.stop()
        time.sleep(0.05)
        await gauges.observe(directory, Redis.from_url(redis.url), "ns")  # type: ignore
        assert samples(m.registry)[("splitserve_pool_desired_replicas",
                                    (("pool", "decode"),))] == 3
    finally:
        await client.aclose()
