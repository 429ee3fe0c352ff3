"""The gateway's metrics on a port of their own (GatewayConfig.metrics_port): a real
`splitserve gateway` process against a real Redis, no workers. The metrics port serves GET
/metrics and nothing else (vLLM's families and the gateway's own); the API port still serves
the API and answers /metrics with 404."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from pydantic import ValidationError

from router.registry import DEFAULT_NAMESPACE
from services import cluster_secret
from services.controller.pool_sizes import PoolSizes
from services.controller.builtin_model import ensure_builtin_model
from services.controller.gateway_process import GatewayProcess
from services.gateway.config import GatewayConfig
from services.ports import free_port
from tests.support.cluster import TEST_SECRET, cache_dir_for_tests
from tests.support.redis import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_builtin_model(cache_dir_for_tests(), "tiny")


def start_gateway(tmp_path: Path, model_dir: Path, redis_url: str) -> GatewayProcess:
    secret = tmp_path / "cluster-secret"
    secret.write_text(TEST_SECRET.text)
    secret.chmod(0o600)
    cfg = GatewayConfig(model=str(model_dir), served_model_name="m", redis_url=redis_url,
                        port=free_port(), metrics_port=free_port())
    gw = GatewayProcess(cfg, tmp_path, secret)
    gw.start()
    return gw


def wait_until_serving(gw: GatewayProcess, timeout_s: float) -> None:
    """Until both ports answer (/health is 503 without workers: serving all the same)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert gw.proc is not None
        if gw.proc.poll() is not None:
            raise AssertionError((gw.run_dir / "gateway.log").read_text(errors="replace"))
        try:
            httpx.get(f"http://127.0.0.1:{gw.cfg.metrics_port}/metrics", timeout=2)
            httpx.get(f"{gw.url}/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError((gw.run_dir / "gateway.log").read_text(errors="replace"))


def check_ports(gw: GatewayProcess, extra_family: str, health: int) -> None:
    metrics_url = f"http://127.0.0.1:{gw.cfg.metrics_port}"
    r = httpx.get(f"{metrics_url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    for family in ("splitserve_gateway_requests_in_flight", "splitserve_gateway_live_workers",
                   extra_family):
        assert family in r.text, family
    # the listener serves /metrics only: not the API, not the probes
    for path in ("/health", "/v1/models", "/", "/metrics/extra"):
        assert httpx.get(f"{metrics_url}{path}", timeout=10).status_code == 404, path
    assert httpx.post(f"{metrics_url}/metrics", timeout=10).status_code == 405
    # the API port serves the API, and no metrics
    assert httpx.get(f"{gw.url}/health", timeout=10).status_code == health
    assert httpx.get(f"{gw.url}/v1/models", timeout=10).status_code == 200
    for path in ("/metrics", "/metrics/"):
        r = httpx.get(f"{gw.url}{path}", timeout=10)
        assert r.status_code == 404, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "metrics_on_their_own_port", err
        assert str(gw.cfg.metrics_port) in err["message"]


async def _set_desired(redis_url: str, sizes: dict[str, int]) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        await PoolSizes(client, DEFAULT_NAMESPACE).set_desired(sizes, by="test")
    finally:
        await client.aclose()


def test_metrics_on_their_own_port(tmp_path: Path, model_dir: Path, redis: RedisServer) -> None:
    """vLLM's server keeps its own /metrics route; the guard in front of it answers 404, and
    the listener serves vLLM's registry (vllm:* and the gateway's own families)."""
    gw = start_gateway(tmp_path, model_dir, redis.url)
    try:
        wait_until_serving(gw, 240)
        # the cluster gauges are read from Redis when the listener is scraped
        asyncio.run(_set_desired(redis.url, {"prefill": 3, "decode": 2}))
        check_ports(gw, 'splitserve_pool_desired_replicas{pool="prefill"} 3.0', 503)
        scraped = httpx.get(f"http://127.0.0.1:{gw.cfg.metrics_port}/metrics", timeout=10).text
        assert "vllm:" in scraped
        # API requests are counted (the refused /metrics ones too), scrapes of the listener not
        assert 'route="/metrics",status="404"' in scraped
        assert 'route="/health",status="503"' in scraped  # no workers
    finally:
        gw.stop()
    # a clean stop (uvicorn re-raises the SIGTERM it handled once it has shut down)
    log = (gw.run_dir / "gateway.log").read_text(errors="replace")
    assert gw.proc is not None and gw.proc.returncode in (0, -15) and "Traceback" not in log, log


def test_metrics_port_must_differ_from_the_api_ports(model_dir: Path) -> None:
    with pytest.raises(ValidationError, match="metrics_port 8000 must differ"):
        GatewayConfig(model=str(model_dir), redis_url="redis://unused", port=8000,
                      metrics_port=8000)
    with pytest.raises(ValidationError, match="must differ"):
        GatewayConfig(model=str(model_dir), redis_url="redis://unused", grpc_port=9000,
                      metrics_port=9000)
    env = {k: v for k, v in os.environ.items() if k != cluster_secret.FILE_ENV}
    env[cluster_secret.ENV] = TEST_SECRET.text
    out = subprocess.run([sys.executable, "-m", "services.cli", "gateway", "--model",
                          str(model_dir), "--redis-url", "redis://unused", "--port", "8000",
                          "--metrics-port", "8000"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2 and "must differ" in out.stderr, out.stderr
