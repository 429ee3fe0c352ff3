"""Request id and trace context of gRPC calls, as a server interceptor
(`ServerContextInterceptor`, on the gateway's public API and on the worker API): the handler
runs with the caller's request id bound (services/request_id) inside a server span that
continues the caller's trace (W3C `traceparent` metadata).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from opentelemetry.trace import SpanKind

from services import request_id, tracing


def _metadata_dict(metadata: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


class ServerContextInterceptor(grpc.aio.ServerInterceptor):
    """Runs each handler with the caller's request id bound, in a server span.

    `public`: the id comes from a client, so an invalid one is refused (INVALID_ARGUMENT), a
    missing one is made, and the id is returned as `x-request-id` initial metadata. Otherwise
    (the internal worker API) a missing or invalid id falls back to the request message's
    `request_id` field."""

    def __init__(self, public: bool = False) -> None:
        self.public = public

    def _request_id(self, metadata: dict[str, str], request: Any) -> str:
        sent = metadata.get(request_id.HEADER)
        if self.public:
            return request_id.validate(sent) if sent is not None else request_id.new()
        if sent is not None:
            try:
                return request_id.validate(sent)
            except request_id.InvalidRequestId:
                pass
        return str(getattr(request, "request_id", "") or request_id.new())

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # no client-streaming methods in splitserve's APIs
        method = handler_call_details.method
        metadata = _metadata_dict(handler_call_details.invocation_metadata)
        interceptor = self

        async def begin(request: Any, context: grpc.aio.ServicerContext) -> str:
            try:
                rid = interceptor._request_id(metadata, request)
            except request_id.InvalidRequestId as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if interceptor.public:
                await context.send_initial_metadata(((request_id.HEADER, rid),))
            return rid

        def span(rid: str) -> Any:
            service, _, name = method.lstrip("/").rpartition("/")
            return tracing.tracer().start_as_current_span(
                method.lstrip("/"), context=tracing.extract(metadata), kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                            "splitserve.request_id": rid})

        if handler.response_streaming:
            behavior = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[Any]:
                rid = await begin(request, context)
                with request_id.bound(rid), span(rid):
                    async for response in behavior(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        behavior_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = await begin(request, context)
            with request_id.bound(rid), span(rid):
                return await behavior_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

