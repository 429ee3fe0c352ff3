"""The request id that follows one request through gateway, router and workers.

A client may send its own id in the `x-request-id` header (HTTP) or metadata key (gRPC); the
gateway accepts it when it is printable ASCII of bounded length, and otherwise makes one. The id
lives in a context variable for the duration of the request: log records carry it
(services/logs.py), and gateway -> worker gRPC calls send it as metadata (see
`services/grpc_context.py`).

It is a correlation id, not the engine's request id: two clients may send the same id, but the
vLLM request id must be unique, so the gateway keeps its own unique id for the engines and the
worker logs both.
"""

from __future__ import annotations

import re
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

HEADER = "x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_LENGTH)  # printable ASCII, no spaces

_current: ContextVar[str | None] = ContextVar("splitserve_request_id", default=None)


class InvalidRequestId(ValueError):
    """A client-supplied request id that is not acceptable."""


def validate(value: str) -> str:
    """Return `value` if it is a usable request id, else raise InvalidRequestId."""
    if not _VALID.fullmatch(value):
        raise InvalidRequestId(
            f"{HEADER} must be 1 to {MAX_LENGTH} printable ASCII characters without spaces")
    return value


def new() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def current() -> str | None:
    """The request id of the request being handled in this context, if any."""
    return _current.get()


@contextmanager
def bound(request_id: str | None) -> Iterator[None]:
    """Make `request_id` the current one inside the block."""
    token = _current.set(request_id)
    try:
        yield
    finally:
        _current.reset(token)
