"""What the vLLM front end checks of a generation request body before vLLM's server parses it:
the fields splitserve owns (services/gateway/reserved_fields.py), and the shapes that crash
the pinned vLLM's request validators with a 500 instead of a 400.

vLLM 0.32's `check_structured_outputs_count` (chat and completion request models) calls
`.get` on `structured_outputs` before pydantic has checked its type, so a string or a list
there is an AttributeError, which its server answers with 500 InternalServerError (found by
tests/e2e/test_fuzz_openapi.py). The gateway refuses such a body with the 400 that pydantic's
own type check would have given; tests/unit/test_body_checks.py fails once vLLM no longer
crashes on it, so that this check can go.
"""

from __future__ import annotations

import json

from services.gateway.errors import APIError
from services.gateway.reserved_fields import MARKS as RESERVED_MARKS
from services.gateway.reserved_fields import reserved_in

OBJECT_FIELDS = ("structured_outputs",)
"""Fields that must be JSON objects (or null) for vLLM's validators not to crash."""
_MARKS = tuple(f'"{name}"'.encode() for name in OBJECT_FIELDS)


def frontend_body_refusal(body: bytes) -> APIError | None:
    """A 400 for the first field of a JSON request body that the gateway refuses, or None.
    Bodies that mention none of the fields concerned are not parsed here."""
    if not any(mark in body for mark in _MARKS + RESERVED_MARKS):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # vLLM answers a body that is not JSON
    if not isinstance(data, dict):
        return None
    if (refusal := reserved_in(data)) is not None:
        return refusal
    for name in OBJECT_FIELDS:
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            return APIError(400, f"'{name}' must be an object, not {type(value).__name__}",
                            type="BadRequestError", param=name, code=400)
    return None
