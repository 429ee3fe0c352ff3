"""The planner's Prometheus source against a real Prometheus server (Debian package, installed by
scripts/install_prometheus.sh) scraping a worker-like metrics endpoint over HTTP."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from services.planner.config import PrometheusQueries
from services.planner.sources import PrometheusSource
from services.ports import free_port


@pytest.fixture
def worker() -> Iterator[tuple[int, Histogram, Counter]]:
    reg = CollectorRegistry()
    ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", ["engine"],
                     buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=reg)
    tokens = Counter("vllm:prompt_tokens_by_source", "prompt tokens", ["engine", "source"],
                     registry=reg)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=reg)
    yield port, ttft, tokens
    server.shutdown()
    server.server_close()


@pytest.fixture
def prometheus(tmp_path: Path, worker) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run scripts/install.sh"
    target_port = worker[0]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "workers", "static_configs": [{
            "targets": [f"127.0.0.1:{target_port}"],
            # what the chart's PodMonitor does from the pod label ray.io/group
            "labels": {"splitserve_pool": "prefill"}}]}]}))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def test_prometheus_source_reads_windowed_quantiles(prometheus: str, worker) -> None:
    _, ttft, tokens = worker
    for _ in range(20):
        ttft.labels("0").observe(0.2)
    tokens.labels("0", "local_compute")  # the series exists (at 0) before Prometheus scrapes
    source = PrometheusSource(prometheus, PrometheusQueries(), window_s=30)
    try:
        # wait until Prometheus holds two scrapes of the worker
        for _ in range(60):
            n = await source.query('count_over_time(up{job="workers"}[30s])')
            if n is not None and n >= 2:
                break
            await asyncio.sleep(0.5)
        figures = (await source.collect([]))["prefill"]
        # nothing increased inside the window: no rate, no quantile (NaN -> None)
        assert figures.complete and figures.ttft_p90_s is None

        for _ in range(100):
            ttft.labels("0").observe(1.5)
        tokens.labels("0", "local_compute").inc(3000)
        for _ in range(60):
            figures = (await source.collect([]))["prefill"]
            if figures.ttft_p90_s is not None and figures.prompt_tokens_per_s:
                break
            await asyncio.sleep(0.5)
        assert figures.complete
        # all 100 new observations are in (1.0, 2.5]: p90 interpolates to 1 + 1.5 * 0.9
        assert figures.ttft_p90_s == pytest.approx(2.35, rel=0.01)
        assert figures.prompt_tokens_per_s > 0
        decode = (await source.collect([]))["decode"]
        assert decode.itl_p90_s is None and decode.complete  # no decode series: no figure

        bad = PrometheusSource(prometheus, PrometheusQueries(ttft="sum(("), window_s=30)
        try:
            assert (await bad.collect([]))["prefill"].complete is False
        finally:
            await bad.aclose()
    finally:
        await source.aclose()
