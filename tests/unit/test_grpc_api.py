"""The gateway's gRPC servicer on a stand-in Gateway (no workers): requests validate exactly as
on HTTP, errors map to status codes, the admission limit (shared with HTTP) gives
RESOURCE_EXHAUSTED / 429, and cancelling a call unwinds the PD flow (which aborts on workers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI

from services.gateway.admission import Admission
from services.gateway.app import PreparedRequest
from services.gateway.http_guard import GuardMiddleware
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError, install_error_handlers
from services.gateway.grpc_api import (
    chat_request,
    completion_request,
    start_grpc_server,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.pd_flow import WorkerUnavailable
from services.ports import free_port
from tests.support.fake_flow import FakeFlow
from services.proto.v1 import worker_pb2 as wpb
from splitserve_sdk.proto.v1 import inference_pb2 as ipb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as ipb_grpc


def test_proto_requests_become_the_http_models() -> None:
    req = completion_request(ipb.CompleteRequest(
        model="m", text="hi", sampling=ipb.SamplingParams(max_tokens=5, temperature=0, seed=3,
                                                          stop=["\n"], ignore_eos=True)))
    assert (req.prompt, req.max_tokens, req.temperature, req.seed, req.stop, req.ignore_eos) == (
        "hi", 5, 0.0, 3, ["\n"], True)
    assert req.top_p == 1.0  # unset: the OpenAI endpoint's default
    assert completion_request(ipb.CompleteRequest(
        model="m", token_ids=ipb.TokenIds(ids=[1, 2]))).prompt == [1, 2]
    assert completion_request(ipb.CompleteRequest(model="m", text="x")).max_tokens == 16
    chat = chat_request(ipb.ChatRequest(model="m", messages=[
        ipb.ChatMessage(role="system", content="s"), ipb.ChatMessage(role="user", content="u",
                                                                     name="bob")]))
    assert [(m.role, m.content, m.name) for m in chat.messages] == [
        ("system", "s", None), ("user", "u", "bob")]
    assert chat.token_limit is None


@pytest.mark.parametrize("build,param", [
    (lambda: chat_request(ipb.ChatRequest(model="m")), "messages"),
    (lambda: chat_request(ipb.ChatRequest(model="m", messages=[
        ipb.ChatMessage(role="wizard", content="x")])), "messages.0.role"),
    (lambda: completion_request(ipb.CompleteRequest(model="m")), "prompt"),
    (lambda: completion_request(ipb.CompleteRequest(
        model="m", text="x", sampling=ipb.SamplingParams(temperature=3))), "temperature"),
    (lambda: completion_request(ipb.CompleteRequest(
        model="m", text="x", sampling=ipb.SamplingParams(max_tokens=0))), "max_tokens"),
    (lambda: completion_request(ipb.CompleteRequest(
        model="m", text="x", sampling=ipb.SamplingParams(top_p=0))), "top_p"),
    (lambda: completion_request(ipb.CompleteRequest(
        model="m", text="x", sampling=ipb.SamplingParams(stop=[""]))), "stop"),
])
def test_invalid_requests_fail_as_on_http(build: Any, param: str) -> None:
    with pytest.raises(APIError) as info:
        build()
    assert info.value.status == 400 and info.value.param == param


# --- the servicer on a stand-in gateway -----------------------------------------------------
class FakeGateway:
    def __init__(self, limit: int = 8) -> None:
        self.cfg = GatewayConfig(model="fake-model", redis_url="redis://unused",
                                 max_in_flight=limit)
        self.admission = Admission(limit)
        self.metrics = GatewayMetrics()
        self.flow = FakeFlow()
        self.directory = None
        self.api_keys = None

    async def prepare(self, req: Any, kind: str) -> PreparedRequest:
        if req.model != self.cfg.name:
            raise APIError(404, f"The model `{req.model}` does not exist.")
        sampling = wpb.SamplingParams(max_tokens=req.max_tokens or 4,
                                      ignore_eos=req.ignore_eos)
        return PreparedRequest(kind=kind, request_id="req-1", token_ids=[1, 2, 3],  # type: ignore
                               sampling=sampling, stream=True, include_usage=False,
                               received_at=time.perf_counter())

    def _record(self, route: str, result: Any) -> None:
        pass


@pytest.fixture
async def served():
    gw = FakeGateway(limit=1)
    port = free_port()
    server = await start_grpc_server(gw, "127.0.0.1", port)  # type: ignore[arg-type]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield gw, ipb_grpc.InferenceStub(channel)
    await channel.close()
    await server.stop(0)


def _chat(model: str = "fake-model", **sampling: Any) -> ipb.ChatRequest:
    return ipb.ChatRequest(model=model, messages=[ipb.ChatMessage(role="user", content="hi")],
                           sampling=ipb.SamplingParams(**sampling))


async def test_stream_ends_with_finish_reason_and_usage(served) -> None:
    gw, stub = served
    chunks = [c async for c in stub.Chat(_chat(max_tokens=3))]
    assert [c.text for c in chunks] == ["t0", "t1", "t2"]
    assert all(c.id == "req-1" for c in chunks)
    assert [c.finish_reason for c in chunks] == ["", "", "length"]
    assert not chunks[0].HasField("usage")
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3, 3, 6)
    assert gw.admission.in_flight == 0
    # the gateway timed it: the first token, the gaps between the next two, the whole
    route = {"route": "grpc:Chat"}
    for name, count in (("time_to_first_token_seconds", 1), ("inter_token_latency_seconds", 2),
                        ("request_duration_seconds", 1)):
        assert gw.metrics.registry.get_sample_value(
            f"splitserve_gateway_{name}_count", route) == count, name
    models = await stub.ListModels(ipb.ListModelsRequest())
    assert [m.id for m in models.models] == ["fake-model"]
    health = await stub.Health(ipb.HealthRequest())
    assert health.status == ipb.HealthResponse.NOT_SERVING


@pytest.mark.parametrize("request_,fail,code", [
    (_chat(model="nope"), None, grpc.StatusCode.NOT_FOUND),
    (_chat(temperature=5), None, grpc.StatusCode.INVALID_ARGUMENT),
    (ipb.ChatRequest(model="fake-model"), None, grpc.StatusCode.INVALID_ARGUMENT),
    (_chat(), WorkerUnavailable("no decode workers"), grpc.StatusCode.UNAVAILABLE),
    (_chat(), ValueError("token out of range"), grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_errors_are_status_codes(served, request_, fail, code) -> None:
    gw, stub = served
    gw.flow.fail = fail
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [c async for c in stub.Chat(request_)]
    assert info.value.code() == code
    assert info.value.details()
    for _ in range(100):  # the client can see the status before the server's handler unwinds
        if gw.admission.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert gw.admission.in_flight == 0


async def test_admission_limit_gives_resource_exhausted(served) -> None:
    gw, stub = served
    first = stub.Chat(_chat(max_tokens=10, ignore_eos=True))
    assert (await first.read()).text == "t0"  # holds the only slot
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [c async for c in stub.Chat(_chat())]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 1" in info.value.details()
    gw.flow.pause.set()
    rest = []
    while (msg := await first.read()) is not grpc.aio.EOF:
        rest.append(msg)
    assert rest[-1].finish_reason == "length"
    assert len([c async for c in stub.Chat(_chat())]) == 4  # the slot is free again


async def test_cancelling_and_deadlines_unwind_the_flow(served) -> None:
    gw, stub = served
    call = stub.Chat(_chat(max_tokens=10, ignore_eos=True))
    assert (await call.read()).text == "t0"
    call.cancel()
    for _ in range(100):
        if gw.flow.closed_early == 1 and gw.admission.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert gw.flow.closed_early == 1 and gw.admission.in_flight == 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [c async for c in stub.Chat(_chat(max_tokens=10, ignore_eos=True), timeout=0.3)]
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if gw.flow.closed_early == 2 and gw.admission.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert gw.flow.closed_early == 2 and gw.admission.in_flight == 0


# --- HTTP side of the admission limit ---------------------------------------------------------
async def test_http_admission_limit_is_429_with_retry_after() -> None:
    admission = Admission(1)
    release = asyncio.Event()
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, admission=admission, api_keys=None,
                       max_body_bytes=1 << 20)

    @app.post("/v1/completions")
    async def completions() -> dict:
        await release.wait()
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as h:
        first = asyncio.create_task(h.post("/v1/completions", json={}))
        while admission.in_flight == 0:
            await asyncio.sleep(0.01)
        r = await h.post("/v1/completions", json={})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "too_many_requests"
        assert (await h.get("/health")).status_code == 200  # not counted
        release.set()
        assert (await first).status_code == 200
        assert admission.in_flight == 0
        assert (await h.post("/v1/completions", json={})).status_code == 200
