"""`splitserve planner`: configuration from file and flags, clear errors, one real step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.controller.pool_sizes import PoolObservation, PoolSizes
from services.planner.cli import _main, add_planner_parser, config_from_args


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="splitserve")
    add_planner_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["planner", *argv])


def test_yaml_config_then_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "planner.yaml"
    cfg_file.write_text("redis_url: redis://r:6379/0\nttft_p90_ms: 800\n"
                        "decode: {min_replicas: 2, max_replicas: 10}\n"
                        "kube: {raycluster: prod, group_names: {prefill: pf, decode: dc}}\n")
    cfg = config_from_args(_parse(["--config", str(cfg_file), "--ttft-p90-ms", "600",
                                   "--decode-max", "12", "--kubeconfig", "/k"]))
    assert cfg.ttft_p90_ms == 600 and cfg.itl_p90_ms == 100
    assert (cfg.decode.min_replicas, cfg.decode.max_replicas) == (2, 12)
    assert cfg.kube.enabled and cfg.kube.kubeconfig == "/k" and cfg.kube.raycluster == "prod"
    assert cfg.kube.group_names == {"prefill": "pf", "decode": "dc"}
    assert cfg.metrics_port == 9400


@pytest.mark.parametrize("argv,needle", [
    ([], "redis_url"),
    (["--redis-url", "redis://x", "--prefill-min", "5", "--prefill-max", "2"], "min_replicas 5"),
    (["--redis-url", "redis://x", "--metrics-source", "prometheus"], "needs prometheus_url"),
    (["--config", "/nonexistent/planner.json"], "cannot read --config"),
])
def test_bad_input_is_a_message_and_exit_2(argv: list[str], needle: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ns = _parse(argv)
    assert ns.func(ns) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitserve planner: invalid configuration") and needle in err


def test_config_file_must_be_a_mapping(tmp_path: Path, capsys) -> None:
    f = tmp_path / "p.json"
    f.write_text("[1, 2]")
    ns = _parse(["--config", str(f)])
    assert ns.func(ns) == 2 and "must hold a mapping" in capsys.readouterr().err


async def test_once_runs_one_step_alone_on_redis(redis_srv, r, capsys) -> None:
    await PoolSizes(r, "splitserve").set_desired({"prefill": 3, "decode": 1}, by="controller")
    await PoolSizes(r, "splitserve").publish_observed(
        {"prefill": PoolObservation(serving=0), "decode": PoolObservation(serving=0)})
    ns = _parse(["--redis-url", redis_srv.url, "--prefill-max", "2", "--once"])
    rc = await _main(config_from_args(ns), once=True)
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["leader"] is True
    # above the configured maximum: brought within bounds at once, no workers needed else
    assert report["decisions"]["prefill"]["target"] == 2
    assert report["decisions"]["prefill"]["reason"] == "bounds"
    assert report["decisions"]["decode"]["direction"] == "hold"
    assert await PoolSizes(r, "splitserve").desired() == {"prefill": 2, "decode": 1}


async def test_pools_the_cluster_does_not_run_are_left_alone(redis_srv, r, capsys) -> None:
    await PoolSizes(r, "splitserve").set_desired({"both": 3}, by="controller")  # aggregated
    ns = _parse(["--redis-url", redis_srv.url, "--both-min", "1", "--both-max", "2", "--once"])
    rc = await _main(config_from_args(ns), once=True)
    decisions = json.loads(capsys.readouterr().out)["decisions"]
    # the one pool it runs is sized (here brought within --both-max); prefill/decode: untouched
    assert rc == 0 and set(decisions) == {"both"}
    assert (decisions["both"]["target"], decisions["both"]["reason"]) == (2, "bounds")
    assert await PoolSizes(r, "splitserve").desired() == {"both": 2}
