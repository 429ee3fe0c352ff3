"""Typed settings of a whole cluster, as `splitserve up` takes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from router.policies import KVPolicyConfig
from router.registry import DEFAULT_NAMESPACE
from router.replica_config import IndexReplicaConfig, RegistryFeedConfig
from services.controller.healing import HealingConfig
from services.gateway.config import MigrationConfig
from services.worker.config import EngineConfig

Mode = Literal["disaggregated", "aggregated"]


def default_cache_dir() -> Path:
    """Where built-in models and compiled kernels are kept between runs."""
    import os

    if explicit := os.environ.get("SPLITSERVE_CACHE_DIR"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "splitserve"


class PoolConfig(BaseModel):
    """A pool of workers of one role and their Ray resources."""

    replicas: int = Field(1, ge=0, description="number of workers")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per worker")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per worker (= TP x PP on GPUs)")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom Ray resources, e.g. {'prefill': 1}")
    placement_group: Literal["auto", "always", "never"] = Field("auto", description=(
        "reserve each worker's resources as a STRICT_PACK placement group (all its GPUs on "
        "one node, reserved before the engine starts); auto: for workers of more than 1 GPU"))
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "vLLM engine arguments of this pool's engines, on top of EngineConfig.engine_args "
        "(vLLM's names; keys every engine must share are refused here)"))


class ClusterConfig(BaseModel):
    """Everything `splitserve up` needs to start (or join) a cluster."""

    mode: Mode = Field("disaggregated", description="prefill+decode pools, or 'both' workers")
    prefill: PoolConfig = Field(default_factory=PoolConfig, description="prefill pool")
    decode: PoolConfig = Field(default_factory=PoolConfig, description="decode pool")
    workers: PoolConfig = Field(default_factory=PoolConfig, description="aggregated pool")
    engine: EngineConfig = Field(description="engine settings shared by all pools")
    host: str = Field("127.0.0.1", description="address the gateway binds")
    port: int = Field(8000, ge=0, le=65535, description="gateway HTTP port; 0 picks a free one")
    grpc_port: int = Field(50051, ge=-1, le=65535, description=(
        "gateway public gRPC port; 0: off, -1 picks a free one"))
    max_in_flight: int = Field(1024, ge=1, description=(
        "gateway admission limit: generation requests (HTTP and gRPC) served at once"))
    max_in_flight_per_client: int = Field(0, ge=0, description=(
        "gateway limit per client (API key, else remote address); 0: none"))
    max_body_bytes: int = Field(1 << 20, ge=1024, description=(
        "gateway: largest request body / gRPC message (HTTP 413 beyond)"))
    cluster_secret_file: Path | None = Field(None, description=(
        "file holding the cluster secret every internal caller of a worker proves "
        "(docs/security.md); None: $SPLITSERVE_CLUSTER_SECRET(_FILE), else a generated one"))
    api_keys_file: Path | None = Field(None, description=(
        "gateway API keys, one per line (also $SPLITSERVE_API_KEYS); none: no authentication"))
    tenant_isolation: bool = Field(False, description=(
        "gateway: a prefix cache per API-key tenant (docs/security.md)"))
    slow_client_timeout_s: float = Field(30.0, ge=0, description=(
        "gateway: a stream whose client took no data this long is cut and aborted; 0: never"))
    route_headers: bool = Field(False, description=(
        "gateway: answer with x-splitserve-* route headers (which workers served, why)"))
    index_replica: IndexReplicaConfig | None = Field(
        default_factory=IndexReplicaConfig, description=(
        "gateway: keep a local replica of the prefix index and route from it (docs/routing.md, "
        "\"The gateway's replica\"); None: every lookup asks Redis"))
    registry_feed: RegistryFeedConfig | None = Field(
        default_factory=RegistryFeedConfig, description=(
        "gateway: follow the registry's change log (docs/routing.md, \"Registry changes, "
        "pushed\"); None: re-read every worker's entry every worker_refresh_s"))
    worker_host: str | None = Field(None, description=(
        "address workers bind and advertise; 'auto': each worker's node IP; None: 127.0.0.1 "
        "with a local Ray, 'auto' when joining one (ray_address: workers on other nodes)"))
    worker_metrics_port: int = Field(0, ge=0, le=65535, description=(
        "Prometheus port of every worker; 0 picks a free one (one worker per node/pod: fixed)"))
    gateway: bool = Field(True, description=(
        "run the gateway in this process tree; off when gateways are deployed on their own"))
    redis_url: str | None = Field(None, description="external Redis; None starts a private one")
    keep_workers_on_stop: bool = Field(False, description=(
        "stopping leaves the workers serving, with their desired sizes, for the next controller "
        "to adopt (needs ray_address: workers are detached); off: stopping stops them"))
    ray_address: str | None = Field(None, description="existing Ray cluster; None starts one")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Redis key namespace of this cluster")
    run_dir: Path | None = Field(None, description="logs, sockets, temp files; None: new tmp dir")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="persistent cache")
    policy: str = Field("kv", description="routing policy: kv, round_robin, random, least_loaded")
    kv_policy: KVPolicyConfig = Field(default_factory=KVPolicyConfig,
                                      description="weights of the kv policy (docs/routing.md)")
    startup_timeout_s: float = Field(600.0, description="how long to wait for healthy workers")
    migration: MigrationConfig = Field(default_factory=MigrationConfig, description=(
        "gateway: moving requests off failed workers"))
    frontend_args: dict[str, Any] = Field(default_factory=dict, description=(
        "gateway: vLLM server settings by vLLM's names (tool_call_parser, chat_template, ...)"))
    healing: HealingConfig = Field(default_factory=HealingConfig,
                                     description="health checks, restarts, drains")
    local_ray_num_cpus: int | None = Field(None, description=(
        "logical CPUs of a local Ray node (workers reserve pool.num_cpus each); None: "
        "max(cores, 4 x the workers planned), so pools can grow"))

    @property
    def advertised_host(self) -> str:
        """What workers bind and advertise: worker_host, else by where Ray runs."""
        if self.worker_host is not None:
            return self.worker_host
        return "auto" if self.ray_address else "127.0.0.1"

    @model_validator(mode="after")
    def _check_pools(self) -> "ClusterConfig":
        if self.mode == "disaggregated" and (self.prefill.replicas < 1 or self.decode.replicas < 1):
            raise ValueError("disaggregated mode needs at least 1 prefill and 1 decode worker")
        if self.mode == "aggregated" and self.workers.replicas < 1:
            raise ValueError("aggregated mode needs at least 1 worker")
        if self.keep_workers_on_stop and not self.ray_address:
            raise ValueError("keep_workers_on_stop needs ray_address: workers on a local Ray "
                             "end with it")
        return self
