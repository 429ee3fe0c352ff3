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
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:  # say where it was, not only that it hung
        raise AssertionError(f"bench ran past 300 s; it printed:\n{exc.stdout}\n{exc.stderr}"
                             ) from None
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
                "--osl", "4", "--model", "no-such-model", "--warmup", "0",
                "--max-seconds", "60")
    (run,) = doc["runs"]
    assert run["requests"] == 3 and run["errors"] == 3
    assert "404" in run["error_samples"][0]
    assert run["ttft_ms"]["p50"] is None and run["req_s"] == 0


def test_mixed_scenario_report_tables_and_plots(disagg: RunningCluster, tmp_path: Path) -> None:
    """A short mixed run: chat turns and long prompts arrive open-loop; the report breaks the
    figures down per class, counts the NIXL transfers, and writes markdown and plots."""
    md, plots = tmp_path / "mixed.md", tmp_path / "plots" / "mixed"
    doc = bench(disagg, tmp_path / "mixed.json", "--scenario", "mixed", "--set",
                "chat_requests=6", "--set", "chat_rate=6", "--set", "chat_osl=16", "--set",
                "long_requests=2", "--set", "long_isl=400", "--concurrency", "16",
                "--max-seconds", "120", "--markdown", str(md), "--plots", str(plots))
    (run,) = doc["runs"]
    assert run["errors"] == 0, run["error_samples"]
    assert set(run["by_tag"]) == {"chat", "long"}
    chat, long = run["by_tag"]["chat"], run["by_tag"]["long"]
    assert (chat["requests"], long["requests"]) == (6, 2)
    assert chat["output_tokens"] == 6 * 16 and long["output_tokens"] == 2 * 8
    assert long["ttft_ms"]["p50"] > 0 and chat["itl_ms"]["p99"] >= chat["itl_ms"]["p50"] > 0
    assert run["tokens_per_chunk"] >= 1.0
    assert len(run["samples"]) == 8 and all(s["chunks"] >= 1 for s in run["samples"])
    kv = run["kv_transfer"]  # every request's prompt KV moved prefill -> decode over NIXL
    assert kv is not None and kv["transfers"] >= 2 and kv["bytes"] > 0 and kv["mean_ms"] > 0
    text = md.read_text()
    assert "| chat: ITL p99 ms |" in text and "| KV transfers |" in text
    png = plots.with_name("mixed_distributions.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
