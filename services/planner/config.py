"""Typed settings of the SLA planner (`splitserve planner`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from router.registry import DEFAULT_NAMESPACE
from services.controller.pool_sizes import MAX_REPLICAS


class PoolLimits(BaseModel):
    """Bounds on one pool's size."""

    min_replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="never fewer workers than this")
    max_replicas: int = Field(8, ge=0, le=MAX_REPLICAS, description="never more workers than this")

    @model_validator(mode="after")
    def _ordered(self) -> "PoolLimits":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class CapacityConfig(BaseModel):
    """Per-worker capacity figures of the model (measure them with `splitserve bench`)."""

    prefill_tokens_per_s: float = Field(4000.0, gt=0, description=(
        "prompt tokens one prefill worker computes per second at saturation"))
    decode_concurrency: float = Field(16.0, gt=0, description=(
        "concurrent decoding requests per decode worker at which ITL still meets its target"))
    target_utilisation: float = Field(0.8, gt=0, le=1, description=(
        "fraction of a worker's capacity the feed-forward estimate plans to use"))
    max_queue_per_worker: float = Field(4.0, gt=0, description=(
        "waiting requests per worker tolerated before the queue alone asks for more workers"))
    kv_usage_target: float = Field(0.8, gt=0, le=1, description=(
        "mean KV-cache usage of decode workers above which the pool grows"))
    max_scale_up_factor: float = Field(2.0, ge=1, description=(
        "one SLO correction multiplies the serving workers by at most this"))


class KubeConfig(BaseModel):
    """Where the planner scales a KubeRay RayCluster and holds its leader Lease."""

    enabled: bool = Field(False, description="patch a RayCluster and elect a leader via a Lease")
    kubeconfig: str | None = Field(None, description="kubeconfig file; None: in-cluster config")
    context: str | None = Field(None, description="kubeconfig context; None: the current one")
    namespace: str = Field("default", description="namespace of the RayCluster and the Lease")
    raycluster: str = Field("splitserve", description="name of the RayCluster to scale")
    group_names: dict[str, str] = Field(
        default_factory=lambda: {"prefill": "prefill", "decode": "decode", "both": "both"},
        description="worker group name in the RayCluster for each pool")
    lease_name: str = Field("splitserve-planner", description="coordination.k8s.io Lease name")
    lease_duration_s: int = Field(15, ge=1, description=(
        "a leader that has not renewed for this long may be replaced"))
    identity: str | None = Field(None, description="this planner's holder identity; None: host-pid")
    patch_attempts: int = Field(3, ge=1, description=(
        "tries of one patch within a step (later steps try again until it lands)"))
    retry_backoff_s: float = Field(0.2, ge=0, description="pause before a patch's next try")


class PrometheusQueries(BaseModel):
    """PromQL for the Prometheus source; `$pool`, `$window` (seconds) and `$q` are substituted.

    Names are matched as `vllm[:_]...`: Prometheus 2.x scrapes OpenMetrics without asking for
    UTF-8 names, and prometheus_client then exposes vLLM's `vllm:x` as `vllm_x`.
    """

    ttft: str = Field(
        'histogram_quantile($q, sum by (le) (rate({__name__=~"vllm[:_]time_to_first_token_'
        'seconds_bucket",splitserve_pool="$pool"}[${window}s])))',
        description="TTFT quantile of a pool's engines, seconds")
    itl: str = Field(
        'histogram_quantile($q, sum by (le) (rate({__name__=~"vllm[:_]inter_token_latency_'
        'seconds_bucket",splitserve_pool="$pool"}[${window}s])))',
        description="inter-token latency quantile of a pool's engines, seconds")
    prompt_tokens_per_s: str = Field(
        'sum(rate({__name__=~"vllm[:_]prompt_tokens_by_source_total",splitserve_pool="$pool",'
        'source="local_compute"}[${window}s]))',
        description="prompt tokens a pool computed per second")


class PlannerConfig(BaseModel):
    """The SLA planner: SLO targets, timing, pool bounds, capacity model, metrics, Kubernetes."""

    redis_url: str = Field(description="the cluster's Redis (registry, desired pool sizes)")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Redis key namespace of the cluster")
    ttft_p90_ms: float = Field(1000.0, gt=0, description="SLO: 90th percentile time to first token")
    itl_p90_ms: float = Field(100.0, gt=0, description="SLO: 90th percentile inter-token latency")
    interval_s: float = Field(10.0, gt=0, description="seconds between planning steps")
    window_s: float = Field(60.0, gt=0, description="metrics window the quantiles cover")
    cooldown_up_s: float = Field(30.0, ge=0, description="min seconds between two scale-ups of a pool")
    cooldown_down_s: float = Field(300.0, ge=0, description=(
        "a pool shrinks only after wanting fewer workers for this long, and this long after "
        "its last change"))
    scale_down_slo_ratio: float = Field(0.7, gt=0, le=1, description=(
        "hysteresis: shrink only while every SLO figure is below this fraction of its target"))
    prefill: PoolLimits = Field(default_factory=PoolLimits, description="prefill pool bounds")
    decode: PoolLimits = Field(default_factory=PoolLimits, description="decode pool bounds")
    both: PoolLimits = Field(default_factory=PoolLimits, description=(
        "bounds of the pool of role both (aggregated clusters)"))
    capacity: CapacityConfig = Field(default_factory=CapacityConfig,
                                     description="capacity model figures (docs/planner.md)")
    metrics_source: Literal["direct", "prometheus"] = Field("direct", description=(
        "direct: scrape each worker's metrics_url from the registry; prometheus: query its API"))
    prometheus_url: str | None = Field(None, description="Prometheus base URL (prometheus source)")
    prometheus_queries: PrometheusQueries = Field(default_factory=PrometheusQueries,
                                                  description="PromQL of the prometheus source")
    scrape_timeout_s: float = Field(5.0, gt=0, description="timeout of one scrape or query")
    kube: KubeConfig = Field(default_factory=KubeConfig, description="Kubernetes settings")
    metrics_host: str = Field("127.0.0.1", description="address of the planner's /metrics")
    metrics_port: int = Field(9400, ge=0, le=65535, description="planner /metrics port; 0: off")

    @model_validator(mode="after")
    def _source(self) -> "PlannerConfig":
        if self.metrics_source == "prometheus" and not self.prometheus_url:
            raise ValueError("metrics_source 'prometheus' needs prometheus_url")
        return self

    def limits(self, pool: str) -> PoolLimits:
        """Bounds of `pool` (prefill, decode or both)."""
        return {"prefill": self.prefill, "decode": self.decode, "both": self.both}[pool]
