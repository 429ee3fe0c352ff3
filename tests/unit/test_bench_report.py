"""The bench report: JSON schema, ratios against the baseline, the printed table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from bench.engine_metrics import PrefixCacheReport
from bench.report import RATIO_METRICS, RunReport, make_report, render, write_json
from bench.stats import Percentiles, RunStats

RUN_KEYS = {"label", "config", "requests", "errors", "ttft_ms", "itl_ms", "e2e_ms",
            "output_tok_s", "req_s", "prefix_hit_rate"}


def run(label: str, scale: float, hit: float | None) -> RunReport:
    p = Percentiles(p50=10 * scale, p90=20 * scale, p99=40 * scale)
    stats = RunStats(requests=8, errors=0, ttft_ms=p, itl_ms=p, e2e_ms=p, output_tokens=80,
                     output_tok_s=100 / scale, req_s=10 / scale, wall_s=0.8)
    prefix = None if hit is None else PrefixCacheReport(
        hit_rate=hit, served_prompt_tokens=1000, computed_prompt_tokens=1000 * (1 - hit))
    return RunReport.build(label, {"policy": label}, stats, prefix)


def test_json_schema(tmp_path: Path) -> None:
    report = make_report([run("kv", 1.0, 0.6), run("round_robin", 2.0, 0.3)])
    path = tmp_path / "out" / "bench.json"
    write_json(report, path)
    doc = json.loads(path.read_text())
    assert set(doc) >= {"runs", "ratios"}
    for r in doc["runs"]:
        assert RUN_KEYS <= set(r)
        for k in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(r[k]) == {"p50", "p90", "p99"}
    assert doc["runs"][0]["prefix_hit_rate"] == 0.6
    assert doc["runs"][0]["config"] == {"policy": "kv"}
    assert doc["baseline"] == "kv"
    assert list(doc["ratios"]) == ["round_robin/kv"]
    assert set(doc["ratios"]["round_robin/kv"]) == set(RATIO_METRICS)


def test_results_json_keeps_outer_levels_indented_and_deeper_ones_on_a_line() -> None:
    from bench.json_text import dumps

    sample = {"ttft_ms": 12.5, "itl_ms": [1.0, 2.0], "worker": "both-0", "cached": None}
    doc = {"runs": [{"label": "kv", "samples": [sample, sample], "extra": {}}], "n": 3}
    text = dumps(doc)
    assert json.loads(text) == doc
    lines = text.splitlines()
    assert lines[:4] == ['{', '  "runs": [', "    {", '      "label": "kv",']
    one = "        " + json.dumps(sample, separators=(", ", ": "))
    assert lines[5:7] == [one + ",", one]  # one line per sample
    assert text.endswith("}\n") and dumps(7) == "7\n" and dumps({}) == "{}\n"


def test_ratios_against_first_or_named_baseline() -> None:
    runs = [run("kv", 1.0, 0.6), run("round_robin", 2.0, 0.3), run("random", 4.0, None)]
    report = make_report(runs)
    rr = report.ratios["round_robin/kv"]
    assert rr["ttft_ms.p50"] == pytest.approx(2.0) and rr["e2e_ms.p99"] == pytest.approx(2.0)
    assert rr["output_tok_s"] == pytest.approx(0.5) and rr["req_s"] == pytest.approx(0.5)
    assert rr["prefix_hit_rate"] == pytest.approx(0.5)
    assert report.ratios["random/kv"]["prefix_hit_rate"] is None
    named = make_report(runs, baseline="round_robin")
    assert set(named.ratios) == {"kv/round_robin", "random/round_robin"}
    assert named.ratios["kv/round_robin"]["ttft_ms.p50"] == pytest.approx(0.5)
    assert named.ratios["kv/round_robin"]["prefix_hit_rate"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        make_report(runs, baseline="nope")
    assert make_report([run("only", 1.0, 0.5)]).ratios == {}
    zero = run("zero", 1.0, 0.0)
    assert make_report([zero, run("x", 1.0, 0.5)]).ratios["x/zero"]["prefix_hit_rate"] is None


def test_table_lists_runs_and_ratios() -> None:
    buf = io.StringIO()
    render(make_report([run("kv", 1.0, 0.6), run("round_robin", 2.0, 0.3)]),
           Console(file=buf, width=120))
    text = buf.getvalue()
    for needle in ("kv", "round_robin", "round_robin/kv", "TTFT p50 ms", "60.0%", "2.00x",
                   "prefix hit rate"):
        assert needle in text, needle
