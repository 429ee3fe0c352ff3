"""Reading guidellm's report (a trimmed copy of a real guidellm 0.8.1 JSON report) and lining
its figures up with splitserve bench's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.industry import (Figures, agreement, guidellm_command, markdown, mean_of,
                            parse_guidellm)

REPORT = Path(__file__).parent / "data" / "guidellm_0.8.1_report.json"


def test_parse_guidellm_report() -> None:
    f = parse_guidellm(json.loads(REPORT.read_text()))
    assert (f.requests, f.errors) == (16, 0)
    assert f.ttft_p50_ms == pytest.approx(112.7636, rel=1e-5)
    assert f.ttft_mean_ms == pytest.approx(114.8606, rel=1e-5)
    assert f.itl_p50_ms == pytest.approx(6.8521, rel=1e-4)
    assert f.itl_mean_ms == pytest.approx(6.7433, rel=1e-4)
    assert f.prompt_tokens_mean == 138.0 and f.output_tok_s == pytest.approx(375.2, rel=1e-3)
    doc = json.loads(REPORT.read_text())
    doc["benchmarks"][0]["metrics"]["request_totals"]["errored"] = 2
    assert parse_guidellm(doc).errors == 2


def test_command_names_the_same_load(tmp_path: Path) -> None:
    cmd = guidellm_command("http://127.0.0.1:9", "m", tmp_path / "tok", 256, 64, 32, 8,
                           tmp_path / "out.json")
    assert cmd[0].endswith(".cache/tools/guidellm/bin/guidellm") and cmd[1] == "run"
    args = dict(zip(cmd[2::2], cmd[3::2]))
    assert args["--backend"] == "kind=openai_http,target=http://127.0.0.1:9,model=m"
    assert args["--profile"] == "kind=concurrent,streams=8"
    assert args["--constraint"] == "kind=max_requests,count=32"
    assert args["--data"] == "kind=synthetic_text,prompt_tokens=256,output_tokens=64"
    assert args["--tokenizer"] == f"kind=huggingface_auto,model={tmp_path / 'tok'}"


def test_agreement_and_table() -> None:
    def fig(ttft: float, itl: float) -> Figures:
        return Figures(requests=8, errors=0, ttft_p50_ms=ttft, ttft_mean_ms=ttft,
                       itl_p50_ms=itl, itl_mean_ms=itl, output_tok_s=100.0,
                       prompt_tokens_mean=140.0)

    ours = mean_of([fig(10, 5), fig(30, 7)])
    assert ours.ttft_p50_ms == 20 and ours.itl_mean_ms == 6 and ours.requests == 16
    theirs = fig(25, 6)
    a = agreement(ours, theirs)
    assert a["ttft_p50_ms"] == pytest.approx(0.8) and a["itl_p50_ms"] == pytest.approx(1.0)
    res = {"splitserve": ours.model_dump(), "guidellm": theirs.model_dump(), "agreement": a,
           "rounds": {"splitserve": [{}, {}], "guidellm": [{}]}}
    lines = markdown(res).strip().splitlines()
    assert lines[2].startswith("| splitserve | 2 | 16 | 0 | 140.0 | 20.0 |")
    assert lines[3].startswith("| guidellm | 1 | 8 | 0 |")
    assert lines[4] == "| splitserve / guidellm | | | | | 0.800 | 0.800 | 1.000 | 1.000 | | | |"


def test_gateway_means_between_two_readings() -> None:
    from bench.industry import gateway_means

    before = {"ttft": (1.0, 10.0), "itl": (0.5, 100.0)}
    after = {"ttft": (1.5, 20.0), "itl": (0.9, 180.0)}
    assert gateway_means(before, after) == pytest.approx(
        {"gateway_ttft_mean_ms": 50.0, "gateway_itl_mean_ms": 5.0})
    assert gateway_means(None, after)["gateway_ttft_mean_ms"] is None


def test_matched_words_give_guidellms_prompt_length_in_tokens() -> None:
    from transformers import AutoTokenizer

    from bench.industry import matched_words
    from bench.workload import SyntheticConfig
    from services.controller.builtin_model import ensure_builtin_model
    from tests.support.cluster import cache_dir_for_tests

    model_dir = ensure_builtin_model(cache_dir_for_tests(), "tiny")
    tok = AutoTokenizer.from_pretrained(model_dir)
    for target in (64, 256):
        isl = matched_words(model_dir, target, requests=32, seed=0)
        wl = SyntheticConfig(requests=32, isl=isl, isl_spread=0, api="chat", seed=0).build()
        counts = [len(tok(r.messages[0][1], add_special_tokens=False)["input_ids"])
                  for r in wl.requests]
        assert abs(sum(counts) / len(counts) - target) <= 0.03 * target, (target, isl)
