"""KV-aware routing on whole clusters: the index is fed by the engines' own KV events, shared
by gateways through Redis, and decides between remote and local prefill."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from services.cluster_secret import FILE_ENV, FILE_NAME
from services.ports import free_port
from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e
MODEL = "splitserve-tiny"


def post(base: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture
def second_gateway(aggregated: RunningCluster, model_dir: Path) -> Iterator[str]:
    """Another gateway process on the same cluster: shares nothing with the first but Redis."""
    port = free_port()
    log = open(aggregated.run_dir / "gateway-2.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "gateway", "--model", str(model_dir),
         "--served-model-name", MODEL, "--redis-url", aggregated.redis_url, "--port", str(port),
         "--policy", "kv"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, FILE_ENV: str(aggregated.run_dir / FILE_NAME)})
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (aggregated.run_dir / "gateway-2.log").read_text()
            assert time.monotonic() < deadline, "second gateway not ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(15)


def test_second_gateway_routes_to_the_cache_the_first_created(
        aggregated: RunningCluster, second_gateway: str) -> None:
    shared = "Shared system prompt of a long multi-turn conversation about the index. " * 16
    first = post(aggregated.http, shared + "First question?")
    owner = first.headers["x-splitserve-decode-worker"]
    n = first.json()["usage"]["prompt_tokens"]
    assert n > 8 * 32
    # The owner's engine publishes the blocks it stored; its worker applies them to Redis.
    time.sleep(1.5)
    for i in range(4):
        r = post(second_gateway, shared + f"Follow-up number {i}?")
        assert r.headers["x-splitserve-decode-worker"] == owner, "did not follow the cache"
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= (n // 32 - 1) * 32, f"engine reports only {cached} cached tokens"
    text = httpx.get(f"{second_gateway}/metrics", timeout=10).text
    line = next(x for x in text.splitlines()
                if x.startswith("splitserve_gateway_predicted_cached_blocks_sum"))
    assert float(line.split()[-1]) >= 4 * (n // 32 - 1)
    assert "splitserve_gateway_index_lookup_seconds_count 4.0" in text


def test_conditional_disaggregation(disagg: RunningCluster) -> None:
    # A short prompt: nothing worth moving, the decode worker prefills it itself.
    short = post(disagg.http, "A short prompt.")
    assert short.headers["x-splitserve-prefill-worker"] == "local"
    assert short.headers["x-splitserve-route-reason"] == "short_uncached_remainder"
    # A long new prompt: prefill worker computes it, KV moves to decode.
    long_prompt = "A long prompt that nobody has seen before, about conditional routing. " * 12
    first = post(disagg.http, long_prompt)
    assert first.headers["x-splitserve-prefill-worker"] != "local"
    time.sleep(1.5)
    # The same prompt again: decode now holds the blocks it received; only a short remainder
    # is uncached, so decode prefills locally and nothing moves.
    again = post(disagg.http, long_prompt)
    assert again.headers["x-splitserve-prefill-worker"] == "local"
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
