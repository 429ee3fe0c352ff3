"""Request fields of vLLM's OpenAI API that splitserve owns and a client may not set.

vLLM's server takes `kv_transfer_params` and `ec_transfer_params` from the client (its own
P/D proxy sets them per request) and passes them, with `vllm_xargs`, to the engine as the
sampling parameters' `extra_args`. In splitserve the gateway runs the prefill -> decode
handoff and sets them itself: one a client wrote would make a decode worker pull KV blocks
from wherever the client says, or a prefill worker hold blocks for a transfer nobody will
make. So the vLLM front end refuses them with a 400 naming the field, before vLLM parses the
request; services/gateway/remote_core.py refuses them again on the engine request.
"""

from __future__ import annotations

import json
from typing import Any

from services.gateway.errors import APIError

RESERVED = ("kv_transfer_params", "ec_transfer_params")
MARKS = tuple(name.encode() for name in RESERVED)
"""Bytes a body that sets a reserved field contains (a cheap test before parsing)."""


def _refused(field: str) -> APIError:
    return APIError(400, f"'{field}' cannot be set by a client: splitserve's gateway runs the "
                    "prefill -> decode KV transfer and sets it for each request itself",
                    type="BadRequestError", param=field, code=400)


def reserved_field_refusal(body: bytes) -> APIError | None:
    """A 400 naming the first reserved field a JSON request body sets (top level or in
    `vllm_xargs`), or None. Bodies that do not mention one are not parsed."""
    if not any(mark in body for mark in MARKS):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # vLLM answers a body that is not JSON
    return reserved_in(data) if isinstance(data, dict) else None


def reserved_in(data: dict[str, Any]) -> APIError | None:
    """A 400 naming the first reserved field a parsed request body sets, or None."""
    xargs = data.get("vllm_xargs")
    for name in RESERVED:
        if data.get(name) is not None:
            return _refused(name)
        if isinstance(xargs, dict) and name in xargs:
            return _refused(f"vllm_xargs.{name}")
    return None


def reserved_extra_args(extra_args: dict[str, Any] | None) -> str | None:
    """The reserved key an engine request's `extra_args` carries, or None."""
    return next((name for name in RESERVED if name in (extra_args or {})), None)
