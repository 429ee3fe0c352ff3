"""`splitserve bench` arguments -> BenchConfig."""

from __future__ import annotations

import pytest

from bench.cli import config_from_args
from bench.runner import parse_compare
from services.cli import build_parser


def cfg(*argv: str):
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def test_parse_compare() -> None:
    assert parse_compare("policy=kv,round_robin") == ("policy", ["kv", "round_robin"])
    assert parse_compare("--mode=aggregated, disaggregated") == (
        "mode", ["aggregated", "disaggregated"])
    # values that hold commas themselves: separated by semicolons
    assert parse_compare("kv-scorer-weights=ttft=1,shared_step=1;ttft=1") == (
        "kv-scorer-weights", ["ttft=1,shared_step=1", "ttft=1"])
    for bad in ("policy", "policy=", "=a,b", "policy=a,a"):
        with pytest.raises(ValueError):
            parse_compare(bad)


def test_flags_to_config() -> None:
    c = cfg("--compare", "policy=round_robin,least_loaded", "--up-args", "--prefill 2 --decode 1",
            "--conversations", "4", "--turns", "2", "--seed", "3", "--set", "user_words=10",
            "--concurrency", "2", "--baseline", "least_loaded")
    assert (c.compare_key, c.compare_values) == ("policy", ["round_robin", "least_loaded"])
    assert c.up_args == ["--prefill", "2", "--decode", "1"]
    assert c.scenario == "prefix-reuse" and c.concurrency == 2 and c.baseline == "least_loaded"
    assert c.scenario_params == {"conversations": 4, "turns": 2, "seed": 3, "user_words": "10"}
    assert c.client("http://h:1/v1").root == "http://h:1"
    u = cfg("--url", "http://127.0.0.1:9/", "--scenario", "synthetic", "--requests", "5")
    assert u.url and u.scenario_params == {"requests": 5} and u.redis_url is None
    with pytest.raises(ValueError):
        cfg("--url", "http://x", "--compare", "policy=a,b")
    with pytest.raises(ValueError):
        cfg("--set", "novalue")


def test_bad_scenario_params_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    assert main(["bench", "--url", "http://127.0.0.1:9", "--scenario", "synthetic",
                 "--turns", "3"]) == 2
    assert "no parameter" in capsys.readouterr().err
