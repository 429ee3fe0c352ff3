"""Typed settings of a worker and of the vLLM engine it owns."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from router.registry import DEFAULT_NAMESPACE, WorkerRole

Device = Literal["cpu", "cuda"]

NIXL_PROGRESS_THREAD_KEY = "progress_thread"
"""kv_connector_extra_config key read by services/worker/nixl_connector.py: run NIXL's UCX
progress thread (EngineConfig.nixl_progress_thread)."""

NIXL_ORDERED_DESCRIPTORS_KEY = "ordered_descriptors"
"""kv_connector_extra_config key read by services/worker/nixl_connector.py: list a KV read's
block pairs by local index so NIXL merges them (EngineConfig.nixl_ordered_descriptors)."""


DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "max_num_seqs": 64,
    "enforce_eager": True,
    "enable_prefix_caching": True,
    "seed": 0,
}
"""Where splitserve's engines start from vLLM's defaults: a smaller batch for small hosts, no
graph compilation (start-up in seconds), prefix caching on (the router's index) and a fixed
default sampling seed."""


class EngineConfig(BaseModel):
    """vLLM engine settings, shared by every worker of a pool."""

    model: str = Field(description="HF-format model directory or hub id")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    tokenizer: str | None = Field(None, description="tokenizer directory; default: the model's")
    device: Device = Field("cpu", description="cpu: vLLM's CPU build; cuda: vLLM's CUDA build")
    dtype: str = Field("float32", description="weights/activations dtype (float32 on CPU)")
    block_size: int = Field(32, description="KV cache block size in tokens (CPU: multiple of 32)")
    max_model_len: int | None = Field(2048, description="context length; None: model's own")
    prefix_caching_hash_algo: str = Field("sha256", description="block hash algorithm")
    hash_seed: str = Field("0", description="PYTHONHASHSEED for engines and router (NONE_HASH)")
    cpu_kv_cache_space_gib: int = Field(1, description="CPU build: KV cache size in GiB")
    tensor_parallel_size: int = Field(1, description="GPUs per engine, tensor parallel")
    pipeline_parallel_size: int = Field(1, description="pipeline stages per engine")
    kv_lease_duration_s: int = Field(30, description="prefill holds KV blocks this long unread")
    nixl_num_threads: int = Field(1, description="NIXL/UCX worker threads per engine")
    nixl_progress_thread: bool = Field(False, description=(
        "run NIXL's UCX progress thread (spins a core per engine; only worth it for transfers "
        "over plain TCP between hosts)"))
    nixl_ordered_descriptors: bool = Field(True, description=(
        "list a KV read's (local, remote) block pairs by local block, so that runs of blocks "
        "that are neighbours on both engines move as one NIXL descriptor even when vLLM "
        "allocated them in descending order (services/worker/kv_descriptors.py)"))
    nixl_backends: list[str] = Field(default_factory=lambda: ["UCX"], description="NIXL backends")
    engine_args: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_ENGINE_ARGS),
                                        description=(
        "vLLM engine arguments for every pool, by vLLM's names (e.g. max_num_batched_tokens), "
        "passed through untouched and validated by vLLM's own parser (docs/settings.md, "
        "\"Engine arguments\"); a pool's own map (PoolConfig.engine_args) goes on top"))
    niceness: int = Field(0, ge=0, le=19, description=(
        "CPU niceness of worker actors and their engine processes (Ray's own default, 15, "
        "runs engines below every other process on the host)"))
    actor_niceness: int = Field(10, ge=0, le=19, description=(
        "CPU niceness of a worker actor's own threads (engine link, KV-event follower, Stats "
        "RPC) once its engine has started, at least `niceness`: where they share cores with the "
        "engine processes, an engine step does not wait behind them"))

    @property
    def name(self) -> str:
        """The model name clients see."""
        return self.served_model_name or self.model


class WorkerConfig(BaseModel):
    """One worker: its role, engine, and where it publishes itself."""

    worker_id: str = Field(description="unique id; also the engine's NIXL engine id")
    role: WorkerRole = Field(description="prefill (KV producer), decode (KV consumer) or both")
    engine: EngineConfig
    host: str = Field("127.0.0.1", description=(
        "address the worker binds and advertises; 'auto': its node's IP (Kubernetes pods)"))
    grpc_port: int = Field(0, description="worker API port (Health, Stats); 0 picks a free one")
    link_port: int = Field(0, description=(
        "engine link port (services/link.py: the gateways' engine-core requests); 0 picks a "
        "free one"))
    metrics_port: int = Field(0, description="Prometheus port; 0 picks a free one")
    redis_url: str = Field(description="registry and index Redis")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Redis key namespace of the cluster")
    run_dir: Path = Field(description="where sockets, caches and temp files of this run live")
    cache_dir: Path = Field(description="persistent cache (compiled kernels, models)")
    cpu_threads_bind: str = Field("nobind", description=(
        "CPU build: the engine's compute cores (VLLM_CPU_OMP_THREADS_BIND), e.g. '0' or '0,1'; "
        "'auto': vLLM's own choice"))
    registry_ttl_s: float = Field(15.0, description=(
        "liveness key TTL in the registry: a worker whose heartbeats stop for this long drops "
        "out of routing (the controller removes failed workers at once; this is the fallback, "
        "long enough for a CPU-starved worker's heartbeat)"))
    heartbeat_interval_s: float = Field(0.5, description="how often load/liveness is published")
    engine_stall_timeout_s: float = Field(60.0, description=(
        "with requests in flight, an engine that completes no step for this long is reported "
        "unhealthy (hung); the controller then replaces the worker"))
