"""The cluster secret on gRPC calls between splitserve's own processes (the worker API).

A caller sends `authorization: Bearer <token>` metadata on every call, the token derived from
the cluster secret (services/cluster_secret.py, `ClusterSecret.grpc_token`); the server
compares it in constant time (hmac.compare_digest) and answers any call without it, or with
another, UNAUTHENTICATED before the handler runs. The token is a bearer credential, not
encryption: docs/security.md says what the network must provide.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

import grpc

from services.cluster_secret import ClusterSecret

log = logging.getLogger(__name__)

HEADER = "authorization"
SCHEME = "Bearer "


def call_metadata(secret: ClusterSecret) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates one call (for a stub call's `metadata=`)."""
    return ((HEADER, SCHEME + secret.grpc_token),)


def client_interceptors(secret: ClusterSecret) -> list[Any]:
    """Interceptors that add the token to every call on a channel (the worker API's calls are
    all unary)."""
    return [_UnaryUnary(secret)]


class _Client:
    def __init__(self, secret: ClusterSecret) -> None:
        self._entry = call_metadata(secret)[0]

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        metadata.add(*self._entry)
        return details._replace(metadata=metadata)


class _UnaryUnary(_Client, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Awaitable[Any]],
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call that does not carry the cluster's token."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._expected = (SCHEME + secret.grpc_token).encode()
        self.refused = 0

    def _authentic(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key.lower() == HEADER:
                got = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or self._authentic(handler_call_details.invocation_metadata):
            return handler
        self.refused += 1
        log.warning("refused %s: no valid cluster token", handler_call_details.method)
        return _refusing(handler)


_REFUSAL = "the cluster secret is required (docs/security.md)"


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED."""
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

    async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
        yield  # pragma: no cover (an async generator: abort raises first)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse, **kw)
