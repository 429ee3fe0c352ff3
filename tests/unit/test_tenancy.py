"""Tenants from the API keys file, their cache salts, and the router hashing with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.block_hash import BlockHasher
from services.cluster_secret import ClusterSecret
from services.gateway.auth import ApiKeyError, ApiKeys
from services.gateway.tenancy import TenantSalts, current_tenant

A1, A2, B, C = "sk-alpha-one-0001", "sk-alpha-two-0002", "sk-bravo-0003", "sk-charlie-0004"


def test_keys_name_their_tenants(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# tenants\n{A1} alpha\n{A2}   alpha  # same tenant\n{B} bravo\n{C}\n")
    keys = ApiKeys.load(f, "SPLITSERVE_TEST_NO_SUCH_VARIABLE")
    assert keys is not None and len(keys) == 4 and keys.tenants == 3
    t = {k: keys.tenant_of(keys.client_of(f"Bearer {k}")) for k in (A1, A2, B, C)}
    assert t[A1] == t[A2] == "alpha" and t[B] == "bravo"
    assert t[C] == keys.client_of(f"Bearer {C}") and C not in t[C]  # its own, not the key
    for bad in (f"{A1} alpha extra\n", f"{A1} al/pha\n", f"{A1} {'x' * 65}\n"):
        f.write_text(bad)
        with pytest.raises(ApiKeyError, match="line 1"):
            ApiKeys.load(f, "SPLITSERVE_TEST_NO_SUCH_VARIABLE")


def test_salts_are_per_tenant_and_per_cluster() -> None:
    one = TenantSalts(ClusterSecret(b"a-cluster-secret-of-32-bytes...."))
    again = TenantSalts(ClusterSecret(b"a-cluster-secret-of-32-bytes...."))
    other = TenantSalts(ClusterSecret(b"another-cluster-secret-32-bytes."))
    assert one.salt("alpha") == again.salt("alpha")  # every gateway agrees
    assert len({one.salt("alpha"), one.salt("bravo"), other.salt("alpha")}) == 3
    # a client's own salt partitions its tenant's cache, but never names another's salt
    assert one.salt("alpha", "mine") not in {one.salt("alpha"), "mine", one.salt("bravo")}
    assert one.for_request("mine") == "mine"  # no tenant set: the client's own, untouched
    token = current_tenant.set("bravo")
    try:
        assert one.for_request(None) == one.salt("bravo")
        assert one.for_request("mine") == one.salt("bravo", "mine")
    finally:
        current_tenant.reset(token)


def test_router_hashes_salted_prompts_as_the_engine_does() -> None:
    """Only the first block's hash takes the salt; every later one chains from it."""
    h = BlockHasher(16, "sha256", "seed")
    tokens = list(range(64))
    plain, salted = h.block_hashes(tokens), h.block_hashes(tokens, cache_salt="s1")
    assert len(plain) == len(salted) == 4
    assert not set(plain) & set(salted)
    assert salted == h.block_hashes(tokens, cache_salt="s1")
    assert not set(salted) & set(h.block_hashes(tokens, cache_salt="s2"))
