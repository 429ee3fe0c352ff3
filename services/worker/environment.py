"""The process environment a worker's vLLM engine needs, derived from its config.

Set before vLLM is imported in the worker process (and inherited by the engine-core process
vLLM spawns). Everything that would otherwise land in $HOME or /tmp is pointed at the run or
cache directory, and nothing reaches out to a model hub.
"""

from __future__ import annotations

from pathlib import Path

from services.worker.config import WorkerConfig


def engine_environment(cfg: WorkerConfig, nixl_side_channel_port: int) -> dict[str, str]:
    """Environment variables for the worker's engine."""
    eng = cfg.engine
    cache = cfg.cache_dir
    env = {
        # Block hashes (NONE_HASH) must be identical on every engine and in the router.
        "PYTHONHASHSEED": eng.hash_seed,
        "VLLM_NIXL_SIDE_CHANNEL_HOST": cfg.host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl_side_channel_port),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TMPDIR": str(cfg.run_dir / "tmp"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_RPC_TIMEOUT": "100000",
        "VLLM_CONFIGURE_LOGGING": "1",
    }
    if _is_local_path(eng.model):
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    if eng.device == "cpu":
        env.update(
            {
                "VLLM_TARGET_DEVICE": "cpu",
                # The default asks for 92% of a NUMA node; an empty value crashes start-up.
                "VLLM_CPU_KVCACHE_SPACE": str(eng.cpu_kv_cache_space_gib),
                "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_threads_bind,
                # Torch's libgomp (vLLM LD_PRELOADs it) parks its worker threads right after
                # each parallel region instead of spinning through the gap between engine
                # steps. Only a team of more than one thread has workers (a multi-core bind;
                # "nobind" serves on one thread). Idle CPU is the same either way; what it
                # saves is spinning on shared cores while serving. KMP_BLOCKTIME is the
                # Intel runtime's equivalent, for when libiomp5 is preloaded instead.
                # (The engine that spins a core while idle is NIXL's UCX progress thread:
                # no environment variable turns it off.)
                "OMP_WAIT_POLICY": "PASSIVE",
                "KMP_BLOCKTIME": "0",
                # NIXL over UCX in host memory, one host: shared memory / cross-memory attach.
                "UCX_TLS": "self,sm,tcp",
            }
        )
        if cfg.cpu_threads_bind != "auto":
            # Cores given explicitly are all the engine's ("auto": vLLM keeps its own for
            # its scheduler process, as its server does).
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def _is_local_path(model: str) -> bool:
    return Path(model).exists()
