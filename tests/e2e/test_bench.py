"""`splitserve bench` against a real disaggregated cluster: the prefix-reuse workload streams
through the gateway, and the engines' own counters show the shared system prompts hitting the
prefix cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def bench(cluster: RunningCluster, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "services.cli", "bench", "--url", cluster.http,
           "--redis-url", cluster.redis_url, "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "splitserve bench" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_prefix_reuse_report(disagg: RunningCluster, tmp_path: Path) -> None:
    doc = bench(disagg, tmp_path / "bench.json", "--scenario", "prefix-reuse",
                "--conversations", "4", "--turns", "2", "--system-prompts", "2", "--osl", "8",
                "--concurrency", "4", "--seed", "5", "--max-seconds", "120")
    assert doc["ratios"] == {}
    (run,) = doc["runs"]
    assert run["errors"] == 0, run["error_samples"]
    assert run["requests"] == 8 and run["unsent"] == 0
    assert run["output_tokens"] == 8 * 8  # ignore_eos: exactly max_tokens each
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        p = run[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
    assert run["output_tok_s"] > 0 and run["req_s"] > 0
    rate = run["prefix_hit_rate"]
    assert rate is not None and 0 < rate <= 1, run["prefix_cache"]
    roles = run["prefix_cache"]["by_role"]
    assert set(roles) == {"prefill", "decode"}
    assert roles["prefill"]["local_cache_hit"] > 0  # the prefill worker reused system prompts
    assert roles["decode"]["external_kv_transfer"] > 0  # and the prompts moved over NIXL
    assert run["config"]["scenario"] == "prefix-reuse"
    assert run["config"]["workload_sha256"]


def test_failed_requests_are_counted(disagg: RunningCluster, tmp_path: Path) -> None:
    doc = bench(disagg, tmp_path / "bad.json", "--scenario", "synthetic", "--requests", "3",
                "--osl", "4", "--model", "no-such-model", "--warmup", "0")
    (run,) = doc["runs"]
    assert run["requests"] == 3 and run["errors"] == 3
    assert "404" in run["error_samples"][0]
    assert run["ttft_ms"]["p50"] is None and run["req_s"] == 0
