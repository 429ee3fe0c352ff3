"""`splitserve bench --compare policy=kv,round_robin --rounds 2` end to end: one cluster started
by the bench, a second gateway beside it with the other policy, paired rounds whose order
rotates, every run under a cache salt of its own, and the head-to-head ratios of the report.

The routing-policy matrices in docs/benchmarks.md are made with this command; this test keeps
its mechanics honest on the built-in tiny model (the figures themselves mean nothing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import cache_dir_for_tests

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]
REPO = Path(__file__).resolve().parents[2]
CONVERSATIONS, TURNS = 4, 3


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("rounds") / "rounds.json"
    up = ("--mode aggregated --workers 2 --route-headers "
          "--frontend-arg enable_prompt_tokens_details=true")
    cmd = [sys.executable, "-m", "services.cli", "bench", "--scenario", "prefix-reuse",
           "--conversations", str(CONVERSATIONS), "--turns", str(TURNS),
           "--system-prompts", str(CONVERSATIONS), "--set", "system_min_words=300",
           "--set", "system_max_words=400", "--set", "user_words=10", "--osl", "4",
           "--concurrency", "2", "--compare", "policy=kv,round_robin", "--rounds", "2",
           "--up-args", up, "--cache-dir", str(cache_dir_for_tests()),
           "--max-seconds", "120", "--json", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"bench ran past 600 s; it printed:\n{exc.stdout}\n{exc.stderr}"
                             ) from None
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "starting a gateway on the same cluster" in proc.stderr, proc.stderr[-2000:]
    return json.loads(out.read_text())


def runs_of(report: dict, policy: str) -> list[dict]:
    return sorted((r for r in report["runs"] if r["target"] == policy), key=lambda r: r["round"])


def test_every_policy_runs_every_round_on_one_cluster_in_rotating_order(report: dict) -> None:
    requests = CONVERSATIONS * TURNS
    kv, rr = runs_of(report, "kv"), runs_of(report, "round_robin")
    assert [r["round"] for r in kv] == [1, 2] and [r["round"] for r in rr] == [1, 2]
    for run in kv + rr:
        assert run["errors"] == 0 and run["unsent"] == 0, run["error_samples"]
        assert run["requests"] == requests and len(run["samples"]) == requests
        assert run["output_tokens"] == requests * 4
    # the cluster serves the first value; the other gets a gateway of its own beside it
    assert {r["config"]["target"] for r in kv} == {"cluster"}
    assert {r["config"]["target"] for r in rr} == {"cluster-gateway"}
    # both sides reach the same two workers (route headers name them)
    workers = {s["worker"] for r in kv + rr for s in r["samples"]}
    assert len(workers) == 2 and None not in workers, workers
    # the order of the sides rotates from round to round
    assert [r["config"]["order_in_step"] for r in kv] == [0, 1]
    assert [r["config"]["order_in_step"] for r in rr] == [1, 0]
    # a round sends both sides the same workload; the next round a fresh one
    assert kv[0]["config"]["workload_sha256"] == rr[0]["config"]["workload_sha256"]
    assert kv[1]["config"]["workload_sha256"] == rr[1]["config"]["workload_sha256"]
    assert kv[0]["config"]["workload_sha256"] != kv[1]["config"]["workload_sha256"]


def test_each_run_starts_cold_under_its_own_cache_salt(report: dict) -> None:
    """Turn 0 of every conversation is new to the cluster in every run, although the other
    side sent the same prompts just before: at most the chat template's first blocks (the
    same for every conversation) are found cached."""
    for run in report["runs"]:
        first = [s for s in run["samples"] if s["index"] < CONVERSATIONS]
        assert len(first) == CONVERSATIONS
        for s in first:
            assert s["cached_tokens"] is not None and s["prompt_tokens"] > 300, s
            assert s["cached_tokens"] <= 32, (run["label"], s)


def test_the_policies_route_as_they_say(report: dict) -> None:
    """kv keeps a conversation's later turns where its earlier ones are cached; round robin
    alternates between the two workers whatever they hold."""
    for run in runs_of(report, "kv"):
        by_index = {s["index"]: s for s in run["samples"]}
        for i in range(CONVERSATIONS, CONVERSATIONS * TURNS):
            s, first = by_index[i], by_index[i % CONVERSATIONS]
            assert s["worker"] == first["worker"], (run["label"], i, s, first)
            # all but the last blocks of the turn before (its generation prompt's tokens
            # become the reply's in the history)
            assert s["cached_tokens"] >= first["prompt_tokens"] - 3 * 16, (run["label"], s)
            assert s["predicted_cached_tokens"] == s["cached_tokens"], (run["label"], s)
    for run in runs_of(report, "round_robin"):
        counts = [w["requests"] for w in run["request_summary"].values()]
        assert sorted(counts) == [CONVERSATIONS * TURNS // 2] * 2, run["request_summary"]


def test_head_to_head_pairs_the_rounds(report: dict) -> None:
    assert report["baseline"] == "kv"
    assert list(report["head_to_head"]) == ["kv/round_robin@c2"], list(report["head_to_head"])
    h2h = report["head_to_head"]["kv/round_robin@c2"]
    for figure in ("ttft_ms.p50", "ttft_ms.p99", "output_tok_s"):
        pr = h2h[figure]
        assert len(pr["values"]) == 2 and all(v > 0 for v in pr["values"]), (figure, pr)
        lo, hi = pr["ci95"]
        assert lo <= pr["ratio"] <= hi and pr["verdict"] in ("better", "worse", "same")
