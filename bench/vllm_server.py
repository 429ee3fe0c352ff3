"""vLLM's own OpenAI server as a benchmark baseline (`splitserve bench --target vllm`).

The baseline is one engine that matches one splitserve worker of an aggregated cluster started
with the same `--up-args`:

- the same engine settings: :func:`engine_config` builds the worker's :class:`EngineConfig`
  from the `splitserve up` flags exactly as `splitserve up` does, and :func:`server_args`
  turns it into vLLM CLI flags (model, served name, dtype, block size, context length, max
  sequences, eager mode, prefix caching and its hash, seed, parallelism, and a KV-event
  publisher like the worker's, with nobody subscribed);
- the same process environment and core binding: :func:`server_env` is the worker's engine
  environment (`services.worker.environment`) for worker 0 of the cluster, whose engine is
  bound to the same core (`VLLM_CPU_OMP_THREADS_BIND`) as splitserve's first worker;
- the same logging: no per-request or access logs, engine stats on (as the worker).

What differs is what is measured: vLLM's API server talks to its engine in-process, a
splitserve request goes gateway (tokenize, route) -> gRPC -> worker actor -> engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from services.processes import kill_survivors
from services.worker.config import EngineConfig

READY_PATH = "/v1/models"


def engine_config(up_args: list[str], cache_dir: Path) -> EngineConfig:
    """The engine settings `splitserve up UP_ARGS` gives its workers."""
    from services.cli import engine_config as up_engine_config

    return up_engine_config(_up_namespace(up_args), cache_dir)


def planned_engines(up_args: list[str]) -> int:
    """How many engines `splitserve up UP_ARGS` starts (their cores are shared out)."""
    ns = _up_namespace(up_args)
    return ns.workers if ns.mode == "aggregated" else ns.prefill + ns.decode


def _up_namespace(up_args: list[str]) -> Any:
    from services.cli import parse_args

    return parse_args(["up", *up_args])


def server_args(eng: EngineConfig, port: int, kv_events_endpoint: str,
                host: str = "127.0.0.1") -> list[str]:
    """`vllm.entrypoints.openai.api_server` flags for the same engine as a worker's: the
    settings splitserve owns, then the worker's engine arguments as vLLM's own tokens."""
    from services.worker.engine_args import cli_tokens

    args = ["--model", eng.model, "--served-model-name", eng.name, "--dtype", eng.dtype,
            "--block-size", str(eng.block_size),
            "--tensor-parallel-size", str(eng.tensor_parallel_size),
            "--pipeline-parallel-size", str(eng.pipeline_parallel_size),
            "--prefix-caching-hash-algo", eng.prefix_caching_hash_algo,
            "--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": kv_events_endpoint, "topic": "kv"}),
            "--host", host, "--port", str(port),
            "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]
    if eng.tokenizer:
        args += ["--tokenizer", eng.tokenizer]
    if eng.max_model_len is not None:
        args += ["--max-model-len", str(eng.max_model_len)]
    args += cli_tokens(eng.engine_args)
    # Explicit, because vLLM's default depends on the caller: the API server's CPU default and
    # the worker's (an AsyncLLM, engine context: SchedulerConfig's) could differ.
    if "max_num_batched_tokens" not in eng.engine_args:
        args += ["--max-num-batched-tokens", str(max_num_batched_tokens(eng))]
    return args


def max_num_batched_tokens(eng: EngineConfig) -> int:
    """Tokens per engine step a worker's engine runs with (its setting, or vLLM's default for
    an engine created outside the API server)."""
    if (given := eng.engine_args.get("max_num_batched_tokens")) is not None:
        return int(given)
    from vllm.config.scheduler import SchedulerConfig

    return SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS


def server_env(eng: EngineConfig, run_dir: Path, cache_dir: Path, engines: int = 1
               ) -> dict[str, str]:
    """The environment of the first worker's engine of a cluster of `engines` engines (same
    core binding)."""
    from router.registry import WorkerRole
    from services.controller.pools import cpu_binding
    from services.worker.config import WorkerConfig
    from services.worker.environment import engine_environment

    wcfg = WorkerConfig(worker_id="vllm-baseline", role=WorkerRole.BOTH, engine=eng,
                        redis_url="redis://unused", run_dir=run_dir, cache_dir=cache_dir,
                        cpu_threads_bind=(cpu_binding(0, engines) if eng.device == "cpu"
                                          else "nobind"))
    env = engine_environment(wcfg, nixl_side_channel_port=0)
    for k in ("VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT"):
        env.pop(k, None)
    return env


@dataclass
class VllmServer:
    """A running vLLM OpenAI server this process started."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout_s: float = 60) -> int:
        """SIGINT (vLLM shuts its engine down), then kill what is left, by PID."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        kill_survivors(kids, timeout_s=10)
        return self.proc.returncode


def start_vllm_server(eng: EngineConfig, run_dir: Path, cache_dir: Path,
                      timeout_s: float = 600, engines: int = 1,
                      extra_args: list[str] | None = None) -> VllmServer:
    """Start vLLM's OpenAI server on a free loopback port and wait until it lists models;
    bound to the cores of the first engine of a cluster of `engines`; `extra_args`: more
    server flags (e.g. a tool-call parser)."""
    from services.ports import free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, **server_env(eng, run_dir, cache_dir, engines)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           *server_args(eng, port, f"ipc://{run_dir}/kv-events.sock"), *(extra_args or [])]
    log_path = run_dir / "vllm-server.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    server = VllmServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(server.url + READY_PATH, timeout=2, trust_env=False).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    raise TimeoutError(f"vLLM's server not ready in {timeout_s}s:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")
