"""Exceptions of the SDK: every failed call raises a SplitserveError carrying the status code."""

from __future__ import annotations

import grpc


class SplitserveError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(SplitserveError):
    """INVALID_ARGUMENT: the request is malformed (not retried)."""


class NotFound(SplitserveError):
    """NOT_FOUND: unknown model."""


class Unauthenticated(SplitserveError):
    """UNAUTHENTICATED: the gateway wants an API key (`token=`) and got none or a wrong one."""


class ResourceExhausted(SplitserveError):
    """RESOURCE_EXHAUSTED: the gateway is at an admission limit (overall or this client's), or
    the request is larger than it accepts; retry later in the first two cases."""


class Unavailable(SplitserveError):
    """UNAVAILABLE: the gateway is not reachable or has no live worker for the request."""


class DeadlineExceeded(SplitserveError):
    """DEADLINE_EXCEEDED: the call's deadline passed (the request was aborted)."""


class Cancelled(SplitserveError):
    """CANCELLED: the call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[SplitserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(exc: grpc.RpcError) -> SplitserveError:
    """The SDK exception for a grpc error (sync or asyncio)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    code = code or grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, SplitserveError)(code, details or code.name)
