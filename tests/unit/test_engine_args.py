"""vLLM engine arguments: parsed by vLLM's own parser, refused where splitserve owns them, per
pool on top of the shared map; `up --engine-arg` / `--config` refuse bad ones before anything
starts (exit 2, the argument named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.controller.pools import cpu_binding, engine_cores
from services.worker.engine_args import (EngineArgsError, check_overrides, cli_tokens, merged,
                                         parse, parse_assignments)


def test_values_are_parsed_as_vllm_parses_them() -> None:
    from vllm.config import CompilationConfig

    out = parse({"max-num-batched-tokens": "4096", "enforce_eager": "false",
                 "enable_chunked_prefill": True, "compilation_config": {"mode": 0},
                 "long_prefill_token_threshold": 512})
    assert out["max_num_batched_tokens"] == 4096
    assert out["enforce_eager"] is False and out["enable_chunked_prefill"] is True
    assert isinstance(out["compilation_config"], CompilationConfig)
    assert out["compilation_config"].mode == 0
    assert out["long_prefill_token_threshold"] == 512


@pytest.mark.parametrize("args, named", [
    ({"max_num_seqs": "many"}, "max_num_seqs"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"enforce_eager": "perhaps"}, "enforce_eager"),
    ({"compilation_config": {"level": 0}}, "compilation_config"),
    ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
])
def test_a_bad_argument_is_refused_with_its_name(args: dict, named: str) -> None:
    with pytest.raises(EngineArgsError, match=named):
        parse(args, "prefill engine arguments")


def test_the_same_tokens_vllm_serve_takes() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = {"max_num_seqs": 8, "enforce_eager": False, "speculative_config": None,
            "enable_lora": True, "max_loras": 2}
    args.pop("speculative_config")
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(cli_tokens(args))
    assert (ns.max_num_seqs, ns.enforce_eager, ns.enable_lora, ns.max_loras) == (8, False,
                                                                                 True, 2)


@pytest.mark.parametrize("key", ["kv_transfer_config", "kv-events-config", "block_size",
                                 "model", "max_model_len", "data_parallel_size"])
def test_what_splitserve_owns_is_refused_everywhere(key: str) -> None:
    with pytest.raises(EngineArgsError, match="set by splitserve"):
        check_overrides({key: "x"}, {})
    with pytest.raises(EngineArgsError, match="set by splitserve"):
        check_overrides({}, {"decode": {key: "x"}})


def test_what_every_engine_shares_may_not_differ_by_pool() -> None:
    check_overrides({"quantization": "fp8", "kv_cache_dtype": "auto"}, {})
    with pytest.raises(EngineArgsError, match="same on every engine"):
        check_overrides({}, {"prefill": {"kv-cache-dtype": "fp8"}})
    with pytest.raises(EngineArgsError, match="unknown pool"):
        check_overrides({}, {"gpu": {"max_num_seqs": 1}})


def test_a_pool_map_goes_on_top_of_the_shared_one() -> None:
    assert merged({"max-num-seqs": 64, "enforce_eager": True},
                  {"max_num_seqs": 8}) == {"max_num_seqs": 8, "enforce_eager": True}
    assert parse_assignments(["a=1", "b-c=x=y", "a=2"], "--engine-arg") == {"a": "2",
                                                                           "b_c": "x=y"}
    with pytest.raises(EngineArgsError, match="KEY=VALUE"):
        parse_assignments(["novalue"], "--engine-arg")


def test_cores_as_vllm_would_use_them() -> None:
    assert cpu_binding(0, 1, [0, 1]) == "auto"  # one engine: vLLM's own allotment
    assert [cpu_binding(i, 2, [0, 1]) for i in range(3)] == ["0", "1", "0"]
    assert [cpu_binding(i, 2, [0, 1, 2, 3]) for i in range(2)] == ["0,1", "2,3"]
    assert [cpu_binding(i, 3, [4, 5, 6, 7, 8, 9, 10]) for i in range(4)] == [
        "4,5", "6,7", "8,9", "4,5"]
    assert [cpu_binding(i, 3, [0, 1]) for i in range(3)] == ["0", "1", "0"]


# --- `splitserve up` --------------------------------------------------------------------------

def _up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        *args: str) -> tuple[int, str]:
    """`up` as the command line runs it, its cluster start-up replaced by a recorder: (exit
    code, stderr), and fails the test if `up` went on to start anything."""
    import services.controller.cluster as cluster
    from services.cli import main

    started = []
    monkeypatch.setattr(cluster, "run_up", lambda cfg: started.append(cfg) or 0)
    try:
        code = main(["up", "--model", str(tmp_path), "--device", "cpu", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    assert not started, "up went on to start a cluster"
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--engine-arg", "max_num_seqs=lots"], "max_num_seqs"),
    (["--decode-engine-arg", "bogus_knob=1"], "bogus_knob"),
    (["--prefill-engine-arg", "kv_cache_dtype=fp8"], "same on every engine"),
    (["--engine-arg", "kv_transfer_config={}"], "set by splitserve"),
    (["--engine-arg", "oops"], "KEY=VALUE"),
    (["--mode", "aggregated", "--prefill-engine-arg", "max_num_seqs=2"],
     "aggregated cluster does not have"),
])
def test_up_refuses_a_bad_engine_argument_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        args: list[str], message: str) -> None:
    code, err = _up(tmp_path, monkeypatch, capsys, *args)
    assert code == 2, err
    assert message in err
    assert err.strip().splitlines()[-1].startswith("splitserve up: ")


def test_up_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import services.controller.cluster as cluster
    from services.cli import main

    seen = []
    monkeypatch.setattr(cluster, "run_up", lambda cfg: seen.append(cfg) or 0)
    model = tmp_path / "model"
    model.mkdir()
    path = tmp_path / "up.yaml"
    path.write_text(f"""
model: {model}
device: cpu
kv-cache-gib: 3
no_gateway: true
engine_args:
  max_num_batched_tokens: 1024
  max-num-seqs: 16
prefill:
  replicas: 2
  engine_args: {{enable_chunked_prefill: true}}
decode:
  resources: {{decode: 1}}
  engine_args: {{max_num_seqs: 4}}
""")
    assert main(["up", "--config", str(path), "--decode", "3",
                 "--prefill-engine-arg", "long_prefill_token_threshold=64"]) == 0
    cfg = seen[0]
    assert cfg.engine.cpu_kv_cache_space_gib == 3 and cfg.gateway is False
    assert cfg.prefill.replicas == 2 and cfg.decode.replicas == 3  # typed flags win
    assert cfg.decode.resources == {"decode": 1.0}
    assert cfg.engine.engine_args["max_num_batched_tokens"] == 1024
    assert cfg.engine.engine_args["max_num_seqs"] == 16
    assert cfg.engine.engine_args["enforce_eager"] is True  # splitserve's default stays
    assert cfg.prefill.engine_args == {"enable_chunked_prefill": True,
                                       "long_prefill_token_threshold": "64"}
    assert cfg.decode.engine_args == {"max_num_seqs": 4}


@pytest.mark.parametrize("text, message", [
    ("engine_args: {max_num_seqs: x}\n", "max_num_seqs"),
    ("no_such_setting: 1\n", "unknown setting `no_such_setting`"),
    ("mode: sideways\n", "invalid choice"),
    ("decode: {replicas: -1}\n", "pool decode"),
    ("[1, 2\n", "not valid YAML"),
    ("both: {engine_args: {kv_cache_dtype: fp8}}\nmode: aggregated\n", "same on every engine"),
])
def test_up_refuses_a_bad_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture, text: str,
                                      message: str) -> None:
    path = tmp_path / "up.yaml"
    path.write_text(text)
    code, err = _up(tmp_path, monkeypatch, capsys, "--config", str(path))
    assert code == 2, err
    assert message in err


def test_engines_on_other_nodes_take_their_nodes_cores() -> None:
    """A share of this host's cores means nothing on another node: joining a Ray cluster,
    every CPU engine takes vLLM's own choice there."""
    from services.controller.config import ClusterConfig
    from services.worker.config import EngineConfig

    local = ClusterConfig(engine=EngineConfig(model="m", device="cpu"))
    remote = local.model_copy(update={"ray_address": "10.0.0.5:6379"})
    gpu = ClusterConfig(engine=EngineConfig(model="m", device="cuda"))
    assert engine_cores(local, 1, 2) == cpu_binding(1, 2) != "auto"
    assert [engine_cores(remote, i, 2) for i in range(2)] == ["auto", "auto"]
    assert engine_cores(gpu, 0, 2) == "nobind"
