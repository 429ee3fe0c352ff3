"""Request id and trace context across gRPC calls, as interceptors.

Client side (`client_interceptors()`, on the gateway's channels to workers): every call
carries the current request id (`x-request-id` metadata) and, with tracing on, a client span and
its W3C `traceparent`. Server side (`ServerContextInterceptor`, on the worker API and on the
gateway's public API): the handler runs with the caller's request id bound (services/request_id)
inside a server span that continues the caller's trace.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services import request_id, tracing


_pending: set[asyncio.Task] = set()  # span-ending tasks (kept referenced until they run)


def _metadata_dict(metadata: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def client_interceptors() -> list[Any]:
    """Interceptors for a channel: request id and trace context on every outgoing call
    (grpc.aio files an interceptor under one call type only, hence one object per type)."""
    return [_UnaryUnary(), _UnaryStream()]


class _ClientContext:
    """Adds the request id and trace context to outgoing calls."""

    def _prepare(self, details: grpc.aio.ClientCallDetails
                 ) -> tuple[grpc.aio.ClientCallDetails, trace.Span | None]:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        if (rid := request_id.current()) is not None:
            metadata.add(request_id.HEADER, rid)
        span = None
        if tracing.enabled():
            method = details.method.decode() if isinstance(details.method, bytes) else (
                details.method)
            service, _, name = method.lstrip("/").rpartition("/")
            span = tracing.tracer().start_span(
                method.lstrip("/"), kind=SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                            "splitserve.request_id": rid or ""})
            carrier: dict[str, str] = {}
            tracing.inject(carrier, span)
            for key, value in carrier.items():
                metadata.add(key, value)
        return details._replace(metadata=metadata), span

    @staticmethod
    def _finish(span: trace.Span | None, call: Any) -> None:
        if span is None:
            return

        async def end(c: Any) -> None:
            try:
                code, details = await c.code(), await c.details()
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
            finally:
                span.end()

        def done(c: Any) -> None:  # grpc.aio's status accessors are coroutines
            task = asyncio.get_running_loop().create_task(end(c))
            _pending.add(task)
            task.add_done_callback(_pending.discard)

        call.add_done_callback(done)



class _UnaryUnary(_ClientContext, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Awaitable[Any]],
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request)
        self._finish(span, call)
        return call


class _UnaryStream(_ClientContext, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Awaitable[Any]],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request)
        self._finish(span, call)
        return call


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

