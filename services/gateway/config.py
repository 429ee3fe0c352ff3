"""Typed settings of a gateway process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from router.policies import KVPolicyConfig
from router.registry import DEFAULT_NAMESPACE
from router.replica_config import IndexReplicaConfig, RegistryFeedConfig

#: block digests a gateway remembers per hashing scheme (GatewayConfig.hash_cache_blocks)
DEFAULT_HASH_CACHE_BLOCKS = 100_000


class MigrationConfig(BaseModel):
    """How the gateway keeps requests alive through worker failures."""

    max_migrations: int = Field(3, ge=0, description=(
        "decode workers a request may move to after the one it started on fails"))
    stall_timeout_s: float = Field(60.0, gt=0, description=(
        "a decode worker silent this long under a request counts as failed (the request "
        "moves)"))
    prefill_timeout_s: float = Field(120.0, gt=0, description=(
        "a prefill slower than this is abandoned: the decode worker computes the prompt"))
    route_wait_s: float = Field(30.0, ge=0, description=(
        "with no serving decode worker while the controller brings workers up, wait this "
        "long for one before 503 (with none coming: 503 at once)"))


class GatewayConfig(BaseModel):
    """One gateway: stateless, many may share a cluster's Redis."""

    model: str = Field(description="model directory (tokenizer and chat template come from it)")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    max_model_len: int = Field(2048, description="context length the workers were started with")
    redis_url: str = Field(description="the cluster's Redis (registry, index)")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Redis key namespace of the cluster")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, description="HTTP port")
    grpc_port: int = Field(0, description="public gRPC port (splitserve.v1.Inference); 0: off")
    metrics_port: int = Field(0, ge=0, le=65535, description=(
        "Prometheus /metrics on a plain HTTP port of its own (on host), which serves nothing "
        "else; the HTTP port then answers /metrics with 404. 0: /metrics on the HTTP port"))
    max_in_flight: int = Field(1024, ge=1, description=(
        "admission limit: generation requests (HTTP and gRPC together) served at once; more "
        "get HTTP 429 / gRPC RESOURCE_EXHAUSTED"))
    max_in_flight_per_client: int = Field(0, ge=0, description=(
        "generation requests one client may have in flight (client: its API key when keys are "
        "on, else its remote address); more get 429 / RESOURCE_EXHAUSTED; 0: no per-client limit"))
    max_body_bytes: int = Field(1 << 20, ge=1024, description=(
        "largest request body (HTTP, also chunked) and gRPC message accepted; larger: HTTP 413 "
        "/ gRPC RESOURCE_EXHAUSTED"))
    slow_client_timeout_s: float = Field(30.0, ge=0, description=(
        "a streaming response whose client has taken no data for this long (the socket "
        "buffers are full) is cut: the connection is closed and the request aborted on the "
        "workers, freeing its admission slot; 0: wait for the client forever"))
    route_headers: bool = Field(False, description=(
        "answer generation requests with x-splitserve-* headers naming the workers that served "
        "them and why; off, they only reach the access log and spans: "
        "with them a client learns the cluster's workers and, by the route, whether others "
        "sent its prefix"))
    api_keys_file: Path | None = Field(None, description=(
        "file of accepted API keys, one per line (# comments); with keys, every HTTP call but "
        "the probes and /metrics, and every gRPC call but Health, needs `authorization: "
        "Bearer <key>`"))
    api_keys_env: str = Field("SPLITSERVE_API_KEYS", description=(
        "environment variable holding accepted API keys (comma or whitespace separated), read "
        "with api_keys_file; unset or empty and no file: no authentication"))
    tenant_isolation: bool = Field(False, description=(
        "with API keys, give each tenant (the tenant a key's line names, else the key itself) "
        "a prefix cache of its own: its prompts are hashed with its own cache_salt in the "
        "router and the engines, so no request hits (or times) another tenant's cached "
        "prefix (docs/security.md)"))
    policy: str = Field("kv", description="routing policy: kv, round_robin, random, least_loaded")
    kv_policy: KVPolicyConfig = Field(default_factory=KVPolicyConfig,
                                      description="weights of the kv policy (docs/routing.md)")
    route_audit_window: int = Field(1000, ge=1, description=(
        "routing audit: the hit precision and recall gauges are over this many last audited "
        "requests (docs/routing.md)"))
    request_timeout_s: float = Field(600.0, gt=0, description=(
        "upper bound on one request's duration: a request still generating after this long "
        "ends with an error and is aborted on its workers"))
    index_replica: IndexReplicaConfig | None = Field(
        default_factory=IndexReplicaConfig, description=(
        "keep a local replica of the prefix index, followed from Redis, and look prompts up "
        "in it (no Redis round trip) while it is synced; null: every lookup asks Redis "
        "(docs/routing.md, \"The gateway's replica\")"))
    hash_cache_blocks: int = Field(DEFAULT_HASH_CACHE_BLOCKS, ge=0, description=(
        "block digests the router remembers (per hashing scheme, oldest forgotten first) so "
        "that a prefix seen again (a system prompt, a conversation's history) is hashed by "
        "dictionary lookups instead of sha256; about 880 bytes each with the block's token "
        "ids (~84 MiB at 100,000), plus the prompts hashed through it remembered whole (as "
        "many of their blocks, ~170 bytes each: a prompt seen again is one lookup); without "
        "extra keys only (a cache_salt or LoRA prompt is hashed in full); 0: hash every "
        "block"))
    index_purge_interval_s: float = Field(30.0, description=(
        "how often dead workers' prefix-index entries are deleted (lookups ignore them anyway)"))
    worker_refresh_s: float = Field(0.5, description=(
        "how often the registry is re-read (with registry_feed: only while the feed is not "
        "synced)"))
    registry_feed: RegistryFeedConfig | None = Field(
        default_factory=RegistryFeedConfig, description=(
        "follow the registry's change log (workers' registrations, load and state pushed on "
        "change) instead of re-reading every worker's entry every worker_refresh_s; null: "
        "re-read (docs/routing.md, \"Registry changes, pushed\")"))
    migration: MigrationConfig = Field(default_factory=MigrationConfig, description=(
        "moving requests off failed workers (docs/operations.md)"))
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "the engines' shared vLLM engine arguments, mirrored so that requests "
        "are checked against the engines' own configuration"))
    frontend_args: dict[str, Any] = Field(default_factory=dict, description=(
        "vLLM's server settings by vLLM's names (tool_call_parser, "
        "enable_auto_tool_choice, reasoning_parser, chat_template, ...)"))

    @model_validator(mode="after")
    def _checks(self) -> "GatewayConfig":
        if self.metrics_port and self.metrics_port in (self.port, self.grpc_port):
            raise ValueError(f"metrics_port {self.metrics_port} must differ from port "
                             f"({self.port}) and grpc_port ({self.grpc_port})")
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
