"""Request id and trace context of real gRPC calls (the server interceptor of the worker API
and of the gateway's public API), spans recorded with OpenTelemetry's InMemorySpanExporter;
the gateway's HTTP middleware."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import grpc
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services import request_id, tracing
from services.gateway.request_context import RequestContextMiddleware
from services.logs import RequestIdFilter
from services.grpc_context import ServerContextInterceptor
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from services.tracing import TracingConfig


class RecordingWorker(pb_grpc.WorkerServicer):
    """Records the request id and trace each handler ran with."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, int]] = []
        self.log = logging.getLogger("test.worker")

    def _record(self, method: str) -> None:
        from opentelemetry import trace

        self.seen.append((method, request_id.current(),
                          trace.get_current_span().get_span_context().trace_id))
        self.log.info("handling %s", method)

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        self._record("Health")
        return pb.HealthResponse(healthy=True)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    assert tracing.setup(TracingConfig(), "test", exporter=exp)
    yield exp
    tracing.shutdown()


async def serve(public: bool) -> tuple[grpc.aio.Server, RecordingWorker, str]:
    server = grpc.aio.server(interceptors=[ServerContextInterceptor(public=public)])
    worker = RecordingWorker()
    pb_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, worker, f"127.0.0.1:{port}"


async def test_tracing_is_off_without_endpoint() -> None:
    assert not tracing.setup(TracingConfig(), "test")
    assert not tracing.enabled()
    with tracing.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()


def caller_metadata(rid: str | None = None) -> tuple[tuple[str, str], ...]:
    """What a traced caller sends: its request id and its span's W3C traceparent."""
    carrier: dict[str, str] = {}
    tracing.inject(carrier)
    given = (("x-request-id", rid),) if rid else ()
    return (*given, *carrier.items())


async def test_a_call_runs_with_the_callers_id_and_continues_its_trace(
        exporter: InMemorySpanExporter) -> None:
    server, worker, address = await serve(public=False)
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.WorkerStub(ch)
            with tracing.tracer().start_as_current_span("caller") as root:
                await stub.Health(pb.HealthRequest(), metadata=caller_metadata("req-7"))
            await stub.Health(pb.HealthRequest())  # no id, no trace: made here
            await stub.Health(pb.HealthRequest(), metadata=(("x-request-id", "x" * 200),))
    finally:
        await server.stop(None)
    trace_id = root.get_span_context().trace_id
    assert worker.seen[0] == ("Health", "req-7", trace_id)
    assert worker.seen[1][1] and worker.seen[1][2] != trace_id
    assert worker.seen[2][1] != "x" * 200  # internal API: an invalid id is replaced
    spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()
             if s.context.trace_id == trace_id}
    server_span = spans[("splitserve.worker.v1.Worker/Health", SpanKind.SERVER)]
    assert server_span.parent.span_id == root.get_span_context().span_id
    assert server_span.attributes["splitserve.request_id"] == "req-7"


async def test_public_api_validates_and_returns_the_id() -> None:
    server, worker, address = await serve(public=True)
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.WorkerStub(ch)
            call = stub.Health(pb.HealthRequest(), metadata=(("x-request-id", "mine-1"),))
            await call
            assert dict(await call.initial_metadata())["x-request-id"] == "mine-1"
            call = stub.Health(pb.HealthRequest())
            await call
            made = dict(await call.initial_metadata())["x-request-id"]
            assert len(made) == 32 and made != "mine-1"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Health(pb.HealthRequest(),
                                  metadata=(("x-request-id", "x" * 200),))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "x-request-id" in (err.value.details() or "")
    finally:
        await server.stop(None)
    assert [s[1] for s in worker.seen] == ["mine-1", made]


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/echo")
    async def echo() -> dict:
        logging.getLogger("test.app").info("inside")
        return {"request_id": request_id.current()}

    app.add_middleware(RequestContextMiddleware)
    return app


async def test_http_middleware(exporter: InMemorySpanExporter,
                               caplog: pytest.LogCaptureFixture) -> None:
    transport = httpx.ASGITransport(app=_app())
    caplog.handler.addFilter(RequestIdFilter())
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        with caplog.at_level(logging.INFO, logger="splitserve.access"):
            given = await client.get("/echo", headers={"x-request-id": "client-abc"})
            made = await client.get("/echo")
            bad = await client.get("/echo", headers={"x-request-id": "has space"})
            traced = await client.get("/echo", headers={
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert given.json() == {"request_id": "client-abc"}
    assert given.headers["x-request-id"] == "client-abc"
    assert made.headers["x-request-id"] == made.json()["request_id"]
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "x-request-id"
    assert bad.json()["error"]["type"] == "invalid_request_error"
    access = [r for r in caplog.records if r.name == "splitserve.access"]
    assert [r.status for r in access] == [200, 200, 400, 200]
    assert access[0].request_id == "client-abc"
    spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert spans[-1].context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert spans[-1].parent.span_id == 0xb7ad6b7169203331
    assert spans[0].attributes["http.response.status_code"] == 200
