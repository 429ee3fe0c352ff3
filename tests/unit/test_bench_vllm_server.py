"""The vLLM baseline is the same engine as a splitserve worker: same settings (as `splitserve
up` derives them, and as vLLM's own argument parser reads them back), same environment and
core."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.vllm_server import engine_config, server_args, server_env
from router.registry import WorkerRole

UP = ["--mode", "aggregated", "--workers", "1", "--block-size", "64", "--max-model-len",
      "1024", "--kv-cache-gib", "2", "--kv-blocks", "700", "--served-model-name", "m1",
      "--device", "cpu"]


def test_engine_config_is_what_up_gives_its_workers(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import services.controller.cluster as cluster
    from services.cli import main

    seen = []
    monkeypatch.setattr(cluster, "run_up", lambda cfg: seen.append(cfg) or 0)
    model = tmp_path / "model"
    model.mkdir()
    args = [*UP, "--model", str(model)]
    assert main(["up", *args]) == 0
    assert engine_config(args, tmp_path) == seen[0].engine


def test_vllm_parses_the_same_engine_args(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from services.worker.config import WorkerConfig
    from services.worker.engine import EngineHost

    eng = engine_config([*UP, "--model", str(tmp_path)], tmp_path)
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(
        server_args(eng, 8123, f"ipc://{tmp_path}/kv.sock"))
    theirs = AsyncEngineArgs.from_cli_args(ns)
    wcfg = WorkerConfig(worker_id="w", role=WorkerRole.BOTH, engine=eng, redis_url="redis://x",
                        run_dir=tmp_path, cache_dir=tmp_path)
    ours = EngineHost(wcfg, f"ipc://{tmp_path}/kv.sock").engine_args()
    for field in ("model", "tokenizer", "served_model_name", "dtype", "block_size",
                  "max_model_len", "max_num_seqs", "enforce_eager", "enable_prefix_caching",
                  "prefix_caching_hash_algo", "seed", "tensor_parallel_size",
                  "pipeline_parallel_size", "kv_transfer_config", "num_gpu_blocks_override"):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert ours.num_gpu_blocks_override == 700
    assert theirs.kv_events_config.enable_kv_cache_events
    assert theirs.kv_events_config.endpoint == ours.kv_events_config.endpoint
    # the worker leaves it to vLLM's engine-context default; the server gets that explicitly
    assert ours.max_num_batched_tokens is None and theirs.max_num_batched_tokens == 2048
    assert (ns.port, ns.host, ns.disable_uvicorn_access_log) == (8123, "127.0.0.1", True)


def test_environment_and_core_of_the_first_worker(tmp_path: Path) -> None:
    from bench.vllm_server import planned_engines
    from services.controller.pools import cpu_binding

    eng = engine_config([*UP, "--model", str(tmp_path)], tmp_path)
    assert planned_engines(UP) == 1
    env = server_env(eng, tmp_path / "run", tmp_path / "cache", planned_engines(UP))
    # one engine: vLLM's own core allotment, as its server makes it by default
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == cpu_binding(0, 1) == "auto"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    two = server_env(eng, tmp_path / "run", tmp_path / "cache", 2)
    assert two["VLLM_CPU_OMP_THREADS_BIND"] == cpu_binding(0, 2)
    assert two["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["PYTHONHASHSEED"] == eng.hash_seed
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env
