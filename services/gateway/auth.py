"""API keys: which bearer tokens the gateway accepts, and who a caller is.

Keys come from a file (one per line, `#` comments; a line may name the key's tenant after it:
`KEY TENANT`) and/or an environment variable (comma or whitespace separated), never from the command line or the JSON config, so they do not show in
process listings or logs. A presented key is compared with every accepted key in constant time
(`hmac.compare_digest` over SHA-256 digests, no early exit), and a caller is named by a short
digest of its key, never by the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

from services.gateway.errors import APIError

_SEPARATORS = re.compile(r"[\s,]+")
MIN_KEY_CHARS = 8
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ApiKeyError(ValueError):
    """The configured keys cannot be used (missing file, no keys, a key too short)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The accepted keys of one gateway."""

    def __init__(self, keys: list[str], tenants: dict[str, str] | None = None) -> None:
        if not keys:
            raise ApiKeyError("no API keys given")
        short = [k for k in keys if len(k) < MIN_KEY_CHARS]
        if short:
            raise ApiKeyError(f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters")
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]
        # client name -> tenant named for its key (a key without one is its own tenant)
        self._tenants = {_client(k): t for k, t in (tenants or {}).items()}

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def load(cls, file: Path | None, env_var: str) -> "ApiKeys | None":
        """The keys from `file` and `$env_var`; None when neither holds any (no auth)."""
        keys: list[str] = []
        tenants: dict[str, str] = {}
        if file is not None:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ApiKeyError(f"cannot read the API keys file {file}: {exc}") from None
            for n, line in enumerate(text.splitlines(), 1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) > 2 or (len(fields) == 2 and not TENANT_NAME.fullmatch(
                        fields[1])):
                    raise ApiKeyError(f"the API keys file {file}, line {n}: want `KEY` or `KEY "
                                      "TENANT` (tenant: 1-64 of A-Z a-z 0-9 . _ -)")
                keys.append(fields[0])
                if len(fields) == 2:
                    tenants[fields[0]] = fields[1]
            if not keys:
                raise ApiKeyError(f"the API keys file {file} holds no keys")
        keys += [k for k in _SEPARATORS.split(os.environ.get(env_var, "")) if k]
        return cls(keys, tenants) if keys else None

    def check(self, key: str) -> bool:
        """Whether `key` is accepted (time independent of where, or whether, it matches)."""
        presented = _digest(key)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(presented, d)
        return ok

    def client_of(self, authorization: str | None) -> str:
        """The caller's name for per-client limits ("key:<digest prefix>") from an
        `authorization` header / metadata value; APIError 401 when missing or not accepted."""
        if not authorization:
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization "
                           "header as `Bearer <key>`.", code="missing_api_key")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "The Authorization header must be `Bearer <key>`.",
                           code="invalid_api_key")
        if not self.check(token):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return _client(token)

    def tenant_of(self, client: str) -> str:
        """The tenant of a caller `client_of` named: its key's tenant, else the key itself."""
        return self._tenants.get(client, client)

    @property
    def tenants(self) -> int:
        """How many tenants the keys make up."""
        named = set(self._tenants.values())
        return len(named) + len(self) - len(self._tenants)


def _client(key: str) -> str:
    return "key:" + _digest(key).hex()[:16]
