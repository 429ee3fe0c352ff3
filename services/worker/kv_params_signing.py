"""Signed KV transfer parameters: a decode worker reads only the KV a prefill worker handed out.

A prefill worker's KV transfer parameters (vLLM's NixlConnector: the prefill engine's id,
host, side-channel port, the request's block ids, ...) tell a decode engine which blocks to
read from where. Unsigned, anyone who could reach a decode worker could point it at another
request's blocks, or at a host of their own. So the prefill worker signs what it hands out:

    params["splitserve_request_id"]  the prefill worker's request id
    params["splitserve_expires_at"]  wall-clock time after which the parameters are refused
    params["splitserve_signature"]   HMAC-SHA256(key, canonical JSON of all the other fields)

with the key derived from the cluster secret (services/cluster_secret.py). The signature covers
every field: request id, remote engine id, host and port, block ids, expiry. The decode worker
verifies before vLLM sees the parameters, and refuses them when the signature is missing or
wrong (`forged`), the expiry has passed (`expired`) or these exact parameters were already
presented to it (`replayed`; remembered until they expire). A refused request is not failed:
its worker drops the parameters and computes the prompt itself (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Callable, Literal

from services.cluster_secret import KV_PARAMS_KEY, ClusterSecret

REQUEST_ID_KEY = "splitserve_request_id"
EXPIRES_KEY = "splitserve_expires_at"
SIGNATURE_KEY = "splitserve_signature"

Reason = Literal["unsigned", "forged", "expired", "replayed"]


class KVParamsRefused(ValueError):
    """Parameters a decode worker must not hand to its engine."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"kv_transfer_params refused ({reason}): {detail}")
        self.reason: Reason = reason


def _canonical(params: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in params.items() if k != SIGNATURE_KEY},
                      sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class KVParamsSigner:
    """Signs (prefill side) and verifies (decode side) KV transfer parameters."""

    def __init__(self, secret: ClusterSecret, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = secret.derive(KV_PARAMS_KEY)
        self.ttl_s = ttl_s
        self._clock = clock
        self._seen: dict[str, float] = {}  # signature -> expiry (replay guard)

    def _mac(self, params: dict[str, Any]) -> str:
        return hmac.new(self._key, _canonical(params), hashlib.sha256).hexdigest()

    def sign(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """A signed copy of `params`, valid for `ttl_s` from now."""
        out = {k: v for k, v in params.items() if k != SIGNATURE_KEY}
        out[REQUEST_ID_KEY] = request_id
        out[EXPIRES_KEY] = round(self._clock() + self.ttl_s, 3)
        out[SIGNATURE_KEY] = self._mac(out)
        return out

    def verify(self, params: dict[str, Any], *, consume: bool = True,
               check_expiry: bool = True) -> dict[str, Any]:
        """The parameters as the engine takes them (signature fields removed), or
        KVParamsRefused. `consume`: remember them, so that a second use is a replay."""
        signature = params.get(SIGNATURE_KEY)
        if not isinstance(signature, str):
            raise KVParamsRefused("unsigned", "no signature")
        try:
            expected = self._mac(params)
        except (TypeError, ValueError) as exc:
            raise KVParamsRefused("forged", f"not canonical JSON ({exc})") from None
        if not hmac.compare_digest(signature, expected):
            raise KVParamsRefused("forged", "the signature does not match")
        now = self._clock()
        expires_at = params.get(EXPIRES_KEY)
        if not isinstance(expires_at, (int, float)):
            raise KVParamsRefused("forged", "no expiry")
        if check_expiry and now > expires_at:
            raise KVParamsRefused("expired", f"expired {now - expires_at:.1f}s ago")
        if consume:
            self._forget_expired(now)
            if signature in self._seen:
                raise KVParamsRefused(
                    "replayed", f"request {params.get(REQUEST_ID_KEY)!r} was presented before")
            self._seen[signature] = float(expires_at)
        return {k: v for k, v in params.items()
                if k not in (SIGNATURE_KEY, EXPIRES_KEY, REQUEST_ID_KEY)}

    def _forget_expired(self, now: float) -> None:
        if len(self._seen) > 64:
            for sig in [s for s, exp in self._seen.items() if exp < now]:
                del self._seen[sig]

    @property
    def remembered(self) -> int:
        """Parameters remembered against replay (they drop out once expired)."""
        return len(self._seen)


def accept_window(lease_s: float) -> float:
    """How long signed KV transfer parameters stay valid (their TTL): seconds after a prefill
    within which a decode worker may still pull its KV.

    The prefill worker frees unread blocks `lease_s` after the prefill; a decode engine renews
    the lease by heartbeats every `lease_s / 6` once the request waits in its scheduler. A
    third of the lease (at least one heartbeat interval) plus a second is kept as margin: past
    the window the decode worker refuses the parameters (`expired`) and computes the prompt
    itself, never reading blocks that may have been freed.
    """
    return max(0.5, lease_s * 2 / 3 - 1.0)


PREFILL_ORDER: dict[str, Any] = {"do_remote_decode": True}
"""The parameters of a request *to* a prefill worker (hold the KV for a decode worker): they
point the engine at nothing remote and are not signed."""


def admit(signer: KVParamsSigner, request_id: str, params: Any,
          on_refused: Callable[[Reason], None], *, release: bool = False,
          log: Any = None) -> dict[str, Any] | None:
    """What a worker hands its engine for a request that came with `params`: the verified
    parameters, the prefill order as it is, or None when they are refused (counted by
    `on_refused(reason)`; the engine then computes the prompt itself). `release`: the
    parameters of a release (blocks to free, not to read), checked for the signature only."""
    if not params or params == PREFILL_ORDER:
        return params or None
    try:
        if not isinstance(params, dict):
            raise KVParamsRefused("forged", f"not a mapping: {type(params).__name__}")
        return signer.verify(params, consume=not release, check_expiry=not release)
    except KVParamsRefused as exc:
        on_refused(exc.reason)
        if log is not None:
            log.warning("request %s: %s; %s", request_id, exc,
                        "not released" if release else "computing the prompt here")
        return None
