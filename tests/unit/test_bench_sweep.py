"""Concurrency sweeps, same-core mode comparisons, per-class figures, the markdown table and
the PNG plots of `splitserve bench`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.cli import config_from_args
from bench.client import RequestResult, RunResult
from bench.plots import is_sweep, write_plots
from bench.report import RunReport, make_report, markdown
from bench.runner import cluster_plan, parse_concurrency
from bench.stats import percentile, summarize
from services.cli import build_parser


def cfg(*argv: str):
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def test_parse_concurrency() -> None:
    assert parse_concurrency("8") == [8]
    assert parse_concurrency("1,2,4, 8,16,32") == [1, 2, 4, 8, 16, 32]
    for bad in ("", "0", "2,2", "a", "1,-4"):
        with pytest.raises(ValueError):
            parse_concurrency(bad)


def test_sweep_and_target_flags() -> None:
    c = cfg("--concurrency", "1,4,16", "--target", "vllm", "--up-args",
            "--mode aggregated --workers 1")
    assert c.sweep == [1, 4, 16] and c.concurrency == 1 and c.target == "vllm"
    one = cfg("--concurrency", "16")
    assert one.sweep == [16] and one.concurrencies == [] and one.target == "splitserve"
    with pytest.raises(ValueError):
        cfg("--url", "http://127.0.0.1:9", "--target", "vllm")
    with pytest.raises(ValueError):
        cfg("--compare", "mode=aggregated,disaggregated", "--target", "vllm")


def test_mode_comparison_uses_the_same_cores() -> None:
    plan = cluster_plan(cfg("--compare", "mode=aggregated,disaggregated"))
    assert [(label, args) for label, args, _ in plan] == [
        ("aggregated", ["--mode", "aggregated", "--workers", "2"]),
        ("disaggregated", ["--mode", "disaggregated"])]
    plan = cluster_plan(cfg("--compare", "mode=disaggregated,aggregated", "--up-args",
                            "--prefill 2 --decode 1"))
    assert plan[1][1] == ["--mode", "aggregated", "--prefill", "2", "--decode", "1",
                          "--workers", "3"]
    with pytest.raises(ValueError, match="same total cores"):
        cluster_plan(cfg("--compare", "mode=aggregated,disaggregated", "--up-args",
                         "--workers 4"))
    # other keys are left alone
    plan = cluster_plan(cfg("--compare", "policy=kv,random", "--up-args", "--workers 2"))
    assert plan[0][1] == ["--policy", "kv", "--workers", "2"]


def test_bad_mode_comparison_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    assert main(["bench", "--compare", "mode=aggregated,disaggregated", "--up-args",
                 "--workers 3"]) == 2
    assert "same total cores" in capsys.readouterr().err


def _result(i: int, tag: str, ttft: float, gaps: list[float], tokens: int) -> RequestResult:
    return RequestResult(i, tag=tag, ok=True, status=200, ttft_s=ttft, itl_s=gaps,
                         e2e_s=ttft + sum(gaps) + 0.001, output_tokens=tokens,
                         content_chunks=len(gaps) + 1)


def test_stats_per_class_tpot_and_tokens_per_chunk() -> None:
    chat = [_result(i, "chat", 0.01, [0.002] * 9, 10) for i in range(4)]
    # a stalled chat: one gap of 200 ms, and one chunk carrying two tokens (11 tokens, 10 chunks)
    chat.append(_result(4, "chat", 0.01, [0.002] * 8 + [0.2], 11))
    long = [_result(5, "long", 0.3, [0.002] * 3, 4)]
    s = summarize(RunResult([*chat, *long], wall_s=1.0, unsent=0, model="m"))
    assert set(s.by_tag) == {"chat", "long"}
    assert s.by_tag["chat"].requests == 5 and s.by_tag["long"].output_tokens == 4
    assert s.by_tag["long"].ttft_ms.p50 == pytest.approx(300.0)
    assert s.by_tag["chat"].itl_ms.p99 > 100 > s.by_tag["long"].itl_ms.p99
    assert s.tokens_per_chunk == pytest.approx(55 / 54)
    # TPOT of the stalled request: (8 * 2 ms + 200 ms) / 10 tokens after the first
    assert s.by_tag["chat"].tpot_ms.p99 == pytest.approx(percentile([2, 2, 2, 2, 21.6], 99))
    assert s.by_tag["chat"].tpot_ms.p50 == pytest.approx(2.0)
    assert len(s.samples) == 6 and s.samples[4].itl_ms[-1] == pytest.approx(200.0)
    assert summarize(RunResult(chat[:1], wall_s=1.0, unsent=0, model="m")).by_tag.keys() == {
        "chat"}


def _run(target: str, c: int, scale: float, tag: bool = False) -> RunReport:
    results = [_result(i, "chat" if tag else "", 0.01 * scale * c, [0.002 * scale] * 7, 8)
               for i in range(c * 2)]
    stats = summarize(RunResult(results, wall_s=0.1 * scale, unsent=0, model="m"))
    label = f"{target}@c{c}"
    return RunReport.build(label, {}, stats, None, target=target, concurrency=c)


def sweep_report():
    runs = [_run(t, c, s) for t, s in (("aggregated", 2.0), ("disaggregated", 1.0))
            for c in (1, 2, 4)]
    return make_report(runs)


def test_sweep_ratios_pair_runs_at_the_same_concurrency() -> None:
    report = sweep_report()
    assert report.baseline == "aggregated"
    assert list(report.ratios) == [f"disaggregated@c{c}/aggregated@c{c}" for c in (1, 2, 4)]
    for r in report.ratios.values():
        assert r["ttft_ms.p50"] == pytest.approx(0.5) and r["output_tok_s"] == pytest.approx(2)
    named = make_report(report.runs, baseline="disaggregated")
    assert list(named.ratios) == [f"aggregated@c{c}/disaggregated@c{c}" for c in (1, 2, 4)]
    # a label names its target too
    assert make_report(report.runs, baseline="disaggregated@c2").baseline == "disaggregated"


def test_markdown_table_with_classes() -> None:
    runs = [_run("aggregated", 4, 2.0, tag=True), _run("disaggregated", 4, 1.0, tag=True)]
    text = markdown(make_report(runs))
    lines = text.strip().splitlines()
    assert lines[0] == ("| metric | aggregated@c4 | disaggregated@c4 | "
                        "disaggregated@c4/aggregated@c4 |")
    assert lines[1] == "|---|---:|---:|---:|"
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    assert row["chat: ITL p99 ms"] == ["4.0", "2.0", "0.50x"]
    assert row["requests"] == ["8", "8", ""]
    assert row["tokens/chunk"] == ["1.00", "1.00", ""]
    assert all(len(cells) == 3 for cells in row.values())


def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_plots(tmp_path: Path) -> None:
    report = sweep_report()
    assert is_sweep(report)
    paths = write_plots(report, tmp_path / "plots" / "mixed")
    assert [p.name for p in paths] == ["mixed_latency.png", "mixed_throughput.png",
                                       "mixed_distributions.png"]
    for p in paths:
        img = _png(p)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas
    single = make_report([_run("a", 4, 1.0, tag=True), _run("b", 4, 2.0, tag=True)])
    assert not is_sweep(single)
    assert [p.name for p in write_plots(single, tmp_path / "one")] == ["one_distributions.png"]


def test_open_loop_scenarios_are_not_throttled_by_default() -> None:
    from bench.cli import OPEN_LOOP_CONCURRENCY

    assert cfg("--scenario", "mixed").sweep == [OPEN_LOOP_CONCURRENCY]
    assert cfg("--scenario", "mixed", "--concurrency", "4").sweep == [4]
    assert cfg("--scenario", "synthetic").sweep == [8]


def test_latency_plot_has_ttft_itl_and_end_to_end_per_target() -> None:
    import matplotlib.pyplot as plt

    from bench.plots import LATENCY_PANELS, latency_figure

    report = sweep_report()
    fig = latency_figure(report)
    try:
        assert [ax.get_title() for ax in fig.axes] == [title for _, title in LATENCY_PANELS]
        e2e = fig.axes[[m for m, _ in LATENCY_PANELS].index("e2e_ms")]
        lines = {ln.get_label(): ln for ln in e2e.get_lines()}
        assert set(lines) == {f"{t} {q}" for t in ("aggregated", "disaggregated")
                              for q in ("p50", "p99")}
        runs = sorted((r for r in report.runs if r.target == "disaggregated"),
                      key=lambda r: r.concurrency or 0)
        assert list(lines["disaggregated p99"].get_xdata()) == [1, 2, 4]
        assert list(lines["disaggregated p99"].get_ydata()) == pytest.approx(
            [r.metric("e2e_ms.p99") for r in runs])
    finally:
        plt.close(fig)


def test_plots_redrawn_from_a_saved_report(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from bench.plots import main

    saved = tmp_path / "report.json"
    saved.write_text(sweep_report().model_dump_json())
    assert main([str(saved), str(tmp_path / "again")]) == 0
    names = [Path(line).name for line in capsys.readouterr().out.split()]
    assert names == ["again_latency.png", "again_throughput.png", "again_distributions.png"]
    assert _png(tmp_path / "again_latency.png")[..., :3].std() > 0.05
    # not a report: a CLI message and exit 2, no files
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": 3}')
    with pytest.raises(SystemExit) as exc:
        main([str(bad), str(tmp_path / "bad")])
    assert exc.value.code == 2
    assert "cannot read a report" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad_*.png"))
