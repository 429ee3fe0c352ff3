"""The SLA planner on a real aggregated cluster: its one pool, `both`, observed through the
registry the workers heartbeat into and the Prometheus pages their real vLLM engines serve."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis

from services.controller.pool_sizes import PoolSizes
from services.planner.config import PlannerConfig, PoolLimits
from services.planner.planner import Planner, StepReport
from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e
MODEL = "splitserve-tiny"


def test_planner_sizes_the_pool_of_an_aggregated_cluster(aggregated: RunningCluster) -> None:
    for i in range(4):  # first tokens and decode steps for the engines' histograms
        r = httpx.post(f"{aggregated.http}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": f"Planner check {i}: name three rivers.", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
    # bounds at the size the cluster runs: the step must read everything and change nothing
    cfg = PlannerConfig(redis_url=aggregated.redis_url, window_s=3600, metrics_port=0,
                        both=PoolLimits(min_replicas=2, max_replicas=2))

    async def step() -> tuple[StepReport, dict[str, int]]:
        redis = Redis.from_url(aggregated.redis_url)
        planner = Planner(cfg, redis)
        try:
            return await planner.step(), await PoolSizes(redis, cfg.namespace).desired()
        finally:
            await planner.aclose()
            await redis.aclose()

    report, desired = asyncio.run(step())
    assert report.leader and not report.errors, report.errors
    assert set(report.decisions) == {"both"}, report.decisions  # no prefill/decode pool here
    sig = report.signals["both"]
    assert sig.serving == 2 and sig.complete, sig
    # the engines both compute first tokens and decode: the pool has both SLO figures
    assert sig.ttft_p90_s is not None and sig.ttft_p90_s > 0, sig
    assert sig.itl_p90_s is not None and sig.itl_p90_s > 0, sig
    assert sig.prompt_tokens_per_s is not None and sig.prompt_tokens_per_s > 0, sig
    assert report.decisions["both"].target == 2, report.decisions
    assert report.desired_written == {} and desired == {"both": 2}
