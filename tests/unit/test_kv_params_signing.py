"""Signed KV transfer parameters: what a decode worker accepts and what it refuses."""

from __future__ import annotations

import json

import msgspec
import pytest

from services.cluster_secret import ClusterSecret
from services.worker.kv_params_signing import (EXPIRES_KEY, PREFILL_ORDER, REQUEST_ID_KEY,
                                               SIGNATURE_KEY, KVParamsRefused, KVParamsSigner,
                                               admit)

SECRET = ClusterSecret.from_text("kv-params-test-secret-0123456789")
PARAMS = {"do_remote_prefill": True, "do_remote_decode": False,
          "remote_block_ids": [[3, 4, 5]], "remote_engine_id": "prefill-0-abc",
          "remote_host": "10.0.0.7", "remote_port": 5600, "tp_size": 1,
          "splitserve_accept_by": 1700000019.25}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def signer(clock: Clock | None = None, secret: ClusterSecret = SECRET) -> KVParamsSigner:
    return KVParamsSigner(secret, ttl_s=30, clock=clock or Clock())


def test_signed_params_verify_once_through_json_and_msgpack() -> None:
    s = signer()
    signed = s.sign("req-1-prefill", PARAMS)
    assert signed[REQUEST_ID_KEY] == "req-1-prefill" and SIGNATURE_KEY in signed
    # the wire: JSON (worker gRPC) and msgpack (the engine link) both keep the signature valid
    assert signer().verify(json.loads(json.dumps(signed))) == PARAMS
    assert signer().verify(msgspec.msgpack.decode(msgspec.msgpack.encode(signed))) == PARAMS
    assert s.verify(signed) == PARAMS and s.remembered == 1


@pytest.mark.parametrize("field,value", [
    ("remote_block_ids", [[3, 4, 6]]), ("remote_engine_id", "prefill-1-def"),
    ("remote_host", "203.0.113.9"), ("remote_port", 5601), (REQUEST_ID_KEY, "req-2-prefill"),
    (EXPIRES_KEY, 1_800_000_000.0), ("extra", "added")])
def test_any_changed_field_is_forged(field: str, value: object) -> None:
    forged = {**signer().sign("req-1-prefill", PARAMS), field: value}
    with pytest.raises(KVParamsRefused) as err:
        signer().verify(forged)
    assert err.value.reason == "forged"


def test_unsigned_other_cluster_expired_and_replayed_are_refused() -> None:
    with pytest.raises(KVParamsRefused) as err:
        signer().verify(dict(PARAMS))
    assert err.value.reason == "unsigned"
    other = signer(secret=ClusterSecret.from_text("another-cluster-secret-0123456789"))
    with pytest.raises(KVParamsRefused) as err:
        signer().verify(other.sign("req-1-prefill", PARAMS))
    assert err.value.reason == "forged"
    clock = Clock()
    s = signer(clock)
    signed = s.sign("req-1-prefill", PARAMS)
    clock.now += 30.5
    with pytest.raises(KVParamsRefused) as err:
        s.verify(signed)
    assert err.value.reason == "expired"
    clock.now -= 1.0  # within the window again: accepted once, then a replay
    s.verify(signed)
    with pytest.raises(KVParamsRefused) as err:
        s.verify(signed)
    assert err.value.reason == "replayed"
    # the same request prefilled again (a retry) gets parameters of its own: accepted
    clock.now += 0.01
    s.verify(s.sign("req-1-prefill", PARAMS))


def test_replay_memory_forgets_expired_parameters() -> None:
    clock = Clock()
    s = signer(clock)
    for i in range(100):
        s.verify(s.sign(f"r{i}", PARAMS))
    clock.now += 31
    s.verify(s.sign("late", PARAMS))
    assert s.remembered == 1


def test_admit_drops_refused_params_and_counts_them() -> None:
    s, refused = signer(), []
    signed = s.sign("p", PARAMS)
    assert admit(s, "d", signed, refused.append) == PARAMS
    assert admit(s, "d", signed, refused.append) is None  # replayed: computed locally
    assert admit(s, "d", {**signed, "remote_port": 1}, refused.append) is None
    assert admit(s, "d", dict(PARAMS), refused.append) is None
    assert refused == ["replayed", "forged", "unsigned"]
    # a prefill order points at nothing remote; no parameters: nothing to check
    assert admit(s, "p", dict(PREFILL_ORDER), refused.append) == PREFILL_ORDER
    assert admit(s, "p", None, refused.append) is None and len(refused) == 3
    # a release frees blocks: the signature is checked, not expiry or reuse
    clock = Clock()
    late = signer(clock)
    release = late.sign("p", PARAMS)
    late.verify(release)
    clock.now += 3600
    assert admit(late, "p-release", release, refused.append, release=True) == PARAMS
    assert admit(late, "p-release", dict(PARAMS), refused.append, release=True) is None
    assert refused[-1] == "unsigned"


def test_params_that_are_not_a_mapping_are_forged() -> None:
    refused: list[str] = []
    assert admit(signer(), "d", ["remote", "blocks"], refused.append) is None
    assert refused == ["forged"]
