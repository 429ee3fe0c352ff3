"""Tenant isolation of the prefix cache (`GatewayConfig.tenant_isolation`, vLLM front end).

Every request of a tenant is given vLLM's `cache_salt`: HMAC-SHA256, keyed by a key derived
from the cluster secret, of the tenant's name (and of the client's own `cache_salt`, when it
sends one). vLLM mixes the salt into the hash of a prompt's first KV block, so equal prompts of
two tenants share no cached block in any engine, and the router hashes with the same salt, so
its prefix index predicts hits per tenant too. Every gateway of a cluster derives the same salt
for a tenant (they share the secret); a client cannot name another tenant's salt (its own
`cache_salt` only partitions its tenant's cache further).

The tenant of a request is set by the HTTP guard (services/gateway/http_guard.py) from the
caller's API key, in a context variable that the engine-core client reads when vLLM's server
hands it the request (the same task).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac

from services.cluster_secret import ClusterSecret

CACHE_SALT_KEY = b"splitserve-tenant-cache-salt"

current_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "splitserve_tenant", default=None)
"""The tenant of the request being served (None: no isolation for it)."""


class TenantSalts:
    """The cache salts of a cluster's tenants."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._key = secret.derive(CACHE_SALT_KEY)

    def salt(self, tenant: str, client_salt: str | None = None) -> str:
        """The `cache_salt` of `tenant`'s requests (with the client's own salt folded in)."""
        msg = tenant.encode("utf-8", "surrogatepass")
        if client_salt:
            msg += b"\0" + client_salt.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def for_request(self, client_salt: str | None) -> str | None:
        """The salt of the current request: its tenant's, or the client's own without one."""
        tenant = current_tenant.get()
        return client_salt if tenant is None else self.salt(tenant, client_salt)
