"""The cluster secret: what every internal caller of a worker proves it knows.

One random value per cluster, shared by the controller, the gateways and the workers (and
nobody else). Every internal credential is derived from it, one per purpose, with HMAC-SHA256
(`ClusterSecret.derive`): the worker gRPC bearer token, the engine link's CURVE keypairs
(services/link.py), the key that signs KV transfer parameters (services/worker/
kv_params_signing.py) and the password of `up`'s private Redis. A leaked derived value gives
nothing else.

Where it comes from, first match wins: `$SPLITSERVE_CLUSTER_SECRET` (the value itself; the
Helm chart sets it from a Kubernetes Secret), `$SPLITSERVE_CLUSTER_SECRET_FILE` (a file holding
it), or a file named by the caller (`splitserve up --cluster-secret-file`). `splitserve up`
generates one when none is given and keeps it in memory and in `<run_dir>/cluster-secret`
(mode 0600); it hands it to its gateway by that file and to worker actors in their environment.
docs/security.md, "Internal authentication".
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Mapping

ENV = "SPLITSERVE_CLUSTER_SECRET"
"""Environment variable holding the secret itself."""
FILE_ENV = "SPLITSERVE_CLUSTER_SECRET_FILE"
"""Environment variable naming a file that holds the secret."""
FILE_NAME = "cluster-secret"
"""The secret's file in a run directory of `splitserve up`."""
MIN_LENGTH = 16
"""Shortest secret accepted, in bytes (a generated one has 32 random bytes)."""

GRPC_TOKEN = b"splitserve-worker-grpc-token"
LINK_SERVER_KEY = b"splitserve-link-server"
LINK_CLIENT_KEY = b"splitserve-link-client"
KV_PARAMS_KEY = b"splitserve-kv-transfer-params"
REDIS_PASSWORD = b"splitserve-private-redis-password"
FINGERPRINT = b"splitserve-secret-fingerprint"


class ClusterSecretError(ValueError):
    """No usable cluster secret."""


class ClusterSecret:
    """The secret, and the credentials derived from it (never printed)."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if len(value) < MIN_LENGTH:
            raise ClusterSecretError(
                f"the cluster secret must have at least {MIN_LENGTH} bytes, not {len(value)}")
        self._value = value

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"

    @classmethod
    def generate(cls) -> "ClusterSecret":
        """A new random secret (32 bytes, URL-safe text so it fits an environment variable)."""
        return cls(secrets.token_urlsafe(32).encode())

    @classmethod
    def from_text(cls, text: str) -> "ClusterSecret":
        """A secret as given by an operator (surrounding whitespace, e.g. a file's final
        newline, is not part of it)."""
        return cls(text.strip().encode())

    @classmethod
    def read(cls, path: Path) -> "ClusterSecret":
        try:
            return cls.from_text(Path(path).read_text())
        except OSError as exc:
            raise ClusterSecretError(f"cannot read the cluster secret file {path}: {exc}"
                                     ) from None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None,
                         file: Path | None = None) -> "ClusterSecret | None":
        """The configured secret ($SPLITSERVE_CLUSTER_SECRET, $SPLITSERVE_CLUSTER_SECRET_FILE,
        then `file`), None when none is configured."""
        env = os.environ if env is None else env
        if value := env.get(ENV):
            return cls.from_text(value)
        if path := env.get(FILE_ENV):
            return cls.read(Path(path))
        if file is not None:
            return cls.read(file)
        return None

    @classmethod
    def required(cls, who: str, env: Mapping[str, str] | None = None) -> "ClusterSecret":
        """The configured secret, or a ClusterSecretError saying how to give one."""
        secret = cls.from_environment(env)
        if secret is None:
            raise ClusterSecretError(
                f"{who} needs the cluster secret: set ${ENV} (or ${FILE_ENV} to a file "
                "holding it); `splitserve up` generates one for the processes it starts "
                "(docs/security.md)")
        return secret

    @property
    def text(self) -> str:
        """The secret itself, for handing it to a process this one starts."""
        return self._value.decode()

    def derive(self, purpose: bytes) -> bytes:
        """32 bytes for one purpose: HMAC-SHA256(secret, purpose)."""
        return hmac.new(self._value, purpose, hashlib.sha256).digest()

    @property
    def grpc_token(self) -> str:
        """The bearer token of worker gRPC calls."""
        return self.derive(GRPC_TOKEN).hex()

    @property
    def redis_password(self) -> str:
        """The password (`requirepass`) of the private Redis `splitserve up` starts."""
        return self.derive(REDIS_PASSWORD).hex()

    @property
    def fingerprint(self) -> str:
        """Names the secret without giving it away: a restarted controller adopts only the
        workers that hold the same one (services/controller/adoption.py)."""
        return self.derive(FINGERPRINT).hex()[:16]

    def write(self, path: Path) -> Path:
        """Store the secret in `path`, readable by this user only (mode 0600)."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
            os.write(fd, self._value)
        finally:
            os.close(fd)
        return path

    def environment(self) -> dict[str, str]:
        """The environment that gives a child process this secret."""
        return {ENV: self.text}
