"""Settings of every Redis client splitserve makes (router/redis_client.py builds them).

Read from the environment (``SPLITSERVE_REDIS_<FIELD>``, e.g. ``SPLITSERVE_REDIS_TIMEOUT_S=1``)
by every process: the gateway, workers, the controller, the planner and the CLI. `splitserve up`
passes the variables on to the workers it starts.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisClientConfig(BaseSettings):
    """Timeouts and connection pool of a Redis client; from SPLITSERVE_REDIS_* variables."""

    model_config = SettingsConfigDict(env_prefix="SPLITSERVE_REDIS_")

    connect_timeout_s: float = Field(0.5, gt=0, description=(
        "longest wait for a new connection (TCP connect, then each reply of its handshake)"))
    timeout_s: float = Field(0.5, gt=0, description=(
        "longest wait for one reply (or one write) on a connection; a silent Redis fails the "
        "call after this long. Every call splitserve makes is short (no blocking commands)"))
    max_connections: int = Field(64, ge=1, description=(
        "connections one client (one process) keeps at most; a call waits for a free one"))
    pool_timeout_s: float = Field(0.25, ge=0, description=(
        "longest wait for a free pooled connection before the call fails"))
    retries: int = Field(1, ge=0, description=(
        "retries of a call whose connection failed (e.g. a pooled connection the server "
        "closed when it restarted); timeouts are not retried, so a silent Redis fails fast"))
    outage_pause_s: float = Field(2.0, ge=0, description=(
        "gateway: after a Redis call failed, request-path lookups skip Redis (route on load "
        "only) this long; the registry refresh keeps probing and ends the pause when it answers"))
    tls_ca_file: str = Field("", description=(
        "rediss:// URLs: the CA bundle (PEM) that signs the Redis server's certificate; empty: "
        "the system's trust store. The server's certificate is always verified, host name "
        "included"))
    tls_cert_file: str = Field("", description=(
        "rediss:// URLs: this client's certificate (PEM), for a Redis that requires client "
        "certificates (tls-auth-clients yes); set with tls_key_file"))
    tls_key_file: str = Field("", description=(
        "rediss:// URLs: the private key (PEM) of tls_cert_file"))
    index_url: str = Field("", description=(
        "the prefix index's own Redis, e.g. a Redis Cluster for a large fleet (docs/routing.md); "
        "empty: the cluster's Redis. The registry and the rest stay on the cluster's Redis"))
    index_cluster: bool = Field(False, description=(
        "index_url is a Redis Cluster (any of its nodes; the client follows the slot map)"))
    tool_timeout_s: float = Field(5.0, gt=0, description=(
        "connect and reply timeout of the command-line tools (status, scale, bench), which "
        "would rather wait on a busy Redis than fail"))

    @model_validator(mode="after")
    def _cert_with_key(self) -> "RedisClientConfig":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("SPLITSERVE_REDIS_TLS_CERT_FILE and SPLITSERVE_REDIS_TLS_KEY_FILE "
                             "go together: set both or neither")
        return self

    @property
    def tls_files(self) -> bool:
        """Whether any TLS file is set."""
        return bool(self.tls_ca_file or self.tls_cert_file)

    def for_tools(self) -> "RedisClientConfig":
        """These settings with the tools' timeouts."""
        return self.model_copy(update={"timeout_s": self.tool_timeout_s,
                                       "connect_timeout_s": self.tool_timeout_s})
