"""Paired rounds (`splitserve bench --target vllm --rounds N`): every round both sides run the
same fresh workload; ratios pair runs of the same round, and the report summarises them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.plots import write_plots
import numpy as np

from bench.report import PAIRED_METRICS, make_report, markdown, pooled_ttft_added
from tests.unit.test_bench_sweep import _png, _run, cfg


def rounds_report(scales: list[float]):
    """vLLM at scale 1.0 every round; the cluster at `scales[k]` in round k + 1 (a larger scale
    is slower: TTFT x scale, throughput / scale)."""
    runs = []
    for k, s in enumerate(scales, start=1):
        for target, scale in (("vllm", 1.0), ("cluster", s)):
            r = _run(target, 16, scale)
            r.label, r.round = f"{target}#{k}", k
            runs.append(r)
    return make_report(runs)


def test_ratios_pair_the_runs_of_one_round_and_the_summary_spans_them() -> None:
    report = rounds_report([1.25, 0.8, 1.0])
    assert list(report.ratios) == ["cluster#1/vllm#1", "cluster#2/vllm#2", "cluster#3/vllm#3"]
    assert report.ratios["cluster#2/vllm#2"]["output_tok_s"] == pytest.approx(1.25)
    row = report.paired["cluster/vllm@c16"]
    assert set(row) == {*PAIRED_METRICS, "added_ms.ttft_ms.p50"}
    tok = row["output_tok_s"]
    assert tok.values == pytest.approx([0.8, 1.25, 1.0])
    assert (tok.median, tok.min, tok.max) == pytest.approx((1.0, 0.8, 1.25))
    ttft = report.runs[0].ttft_ms.p50  # vLLM's, every round
    assert row["added_ms.ttft_ms.p50"].values == pytest.approx(
        [0.25 * ttft, -0.2 * ttft, 0.0], abs=1e-9)
    text = markdown(report)
    assert "| paired rounds | median | min | max | rounds | every round |" in text
    assert "| cluster/vllm@c16: output_tok_s | 1.000 | 0.800 | 1.250 | 3 | 0.800 1.250 1.000 |" \
        in text


def test_the_pooled_ttft_added_uses_every_rounds_requests() -> None:
    report = rounds_report([1.25, 0.8, 1.0])
    pooled = report.pooled["cluster/vllm@c16"]
    # vLLM's 96 requests all at one TTFT; the cluster's a third each at 1.25x, 0.8x and 1x it
    base = report.runs[0].ttft_ms.p50
    assert pooled.requests == (96, 96)
    assert (pooled.baseline_ms, pooled.run_ms, pooled.added_ms) == pytest.approx((base, base, 0))
    assert "| cluster/vllm@c16 | 160.0 ms | 160.0 ms | +0.0 ms |" in markdown(report)


def test_the_pooled_interval_finds_a_shift_the_rounds_scatter_hides() -> None:
    rng = np.random.default_rng(1)
    # 16 rounds of 160 requests each side; TTFT spread like a loaded engine's (p90 ~ 3 x p50)
    base = rng.lognormal(np.log(80), 0.8, 16 * 160)
    run = rng.lognormal(np.log(80), 0.8, 16 * 160) + 3.0
    d = pooled_ttft_added(run.tolist(), base.tolist())
    assert d is not None and d.requests == (2560, 2560)
    assert d.ci95_ms[0] < 3.0 < d.ci95_ms[1]
    assert d.ci95_ms[1] - d.ci95_ms[0] < 12.0
    per_round = [np.median(run[k::16]) - np.median(base[k::16]) for k in range(16)]
    assert max(per_round) - min(per_round) > d.ci95_ms[1] - d.ci95_ms[0]
    same = pooled_ttft_added(base[:1280].tolist(), base[1280:].tolist())
    assert same is not None and same.ci95_ms[0] < 0 < same.ci95_ms[1]
    assert pooled_ttft_added([1.0], base.tolist()) is None


def test_without_rounds_there_is_no_summary() -> None:
    report = make_report([_run("vllm", 16, 1.0), _run("cluster", 16, 1.1)])
    assert report.paired == {} and report.pooled == {}
    assert "paired rounds" not in markdown(report)
    assert "pooled" not in markdown(report)


def test_rounds_want_the_vllm_baseline() -> None:
    c = cfg("--target", "vllm", "--rounds", "8", "--up-args", "--mode aggregated --workers 1")
    assert c.rounds == 8
    with pytest.raises(ValueError, match="--target vllm"):
        cfg("--rounds", "4")
    with pytest.raises(ValueError):
        cfg("--target", "vllm", "--rounds", "0")


def test_plots_take_the_median_round_and_pool_the_distributions(tmp_path: Path) -> None:
    paths = write_plots(rounds_report([1.2, 0.9, 1.0, 1.1]), tmp_path / "r")
    assert [p.name for p in paths] == ["r_distributions.png", "r_head_to_head.png"]
    assert _png(paths[0])[..., :3].std() > 0.05
    assert _png(paths[1])[..., :3].std() > 0.05


def test_head_to_head_judges_the_first_target_against_every_other_beyond_the_interval(
        ) -> None:
    """Three policies, four rounds: kv / round_robin has its TTFT ratio 0.5 every round
    (better beyond any interval), kv / least_loaded scatters around 1 (same), and throughput
    follows TTFT (scale 1/x)."""
    from bench.report import markdown, paired_ratio

    scale = {"kv": [0.5, 0.5, 0.5, 0.5], "round_robin": [1.0] * 4,
             "least_loaded": [0.4, 0.6, 0.45, 0.55]}
    runs = []
    for target in scale:
        for k, s in enumerate(scale[target], start=1):
            r = _run(target, 6, s)
            r.label, r.round = f"{target}#{k}", k
            runs.append(r)
    report = make_report(runs)
    assert set(report.head_to_head) == {"kv/round_robin@c6", "kv/least_loaded@c6"}
    rr = report.head_to_head["kv/round_robin@c6"]
    assert rr["ttft_ms.p50"].ratio == pytest.approx(0.5)
    assert rr["ttft_ms.p50"].ci95 == pytest.approx((0.5, 0.5))
    assert rr["ttft_ms.p50"].verdict == "better" and rr["output_tok_s"].verdict == "better"
    ll = report.head_to_head["kv/least_loaded@c6"]
    assert ll["ttft_ms.p50"].values == pytest.approx([0.5 / 0.4, 0.5 / 0.6, 0.5 / 0.45,
                                                      0.5 / 0.55])
    lo, hi = ll["ttft_ms.p50"].ci95
    assert lo < 1 < hi and ll["ttft_ms.p50"].verdict == "same"
    assert "| kv/round_robin@c6: ttft_ms.p50 | 0.500 | 0.500 .. 0.500 | 4 | better |" \
        in markdown(report)
    # the interval: geometric mean of the ratios, Student's t on their logs (3 d.o.f.)
    p = paired_ratio([1.2, 1.1, 1.3, 1.15], higher_is_better=False)
    assert p is not None and p.verdict == "worse"
    assert p.ratio == pytest.approx((1.2 * 1.1 * 1.3 * 1.15) ** 0.25)
    assert p.ci95[0] == pytest.approx(1.0584, abs=1e-3) and p.ci95[1] == pytest.approx(
        1.3272, abs=1e-3)
    one = paired_ratio([0.9], higher_is_better=True)
    assert one is not None and one.ci95 is None and one.verdict == "same"


def test_rounds_with_compare_are_accepted_and_must_only_change_the_gateway() -> None:
    from bench.gateway_rounds import check_gateway_only, rotated
    from bench.runner import cluster_plan

    up = "--mode aggregated --workers 2 --model /nonexistent/m --served-model-name m"
    c = cfg("--compare", "policy=kv,round_robin,least_loaded", "--rounds", "5",
            "--up-args", up)
    assert (c.rounds, c.compare_values) == (5, ["kv", "round_robin", "least_loaded"])
    check_gateway_only(cluster_plan(c))
    with pytest.raises(ValueError, match="changes engine"):
        check_gateway_only(cluster_plan(cfg("--compare", "kv-blocks=100,200", "--rounds", "2",
                                            "--up-args", up)))
    assert [rotated(["a", "b", "c"], k) for k in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]

