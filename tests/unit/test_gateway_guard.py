"""The gateway's input hardening on its real HTTP app and gRPC servicer (the built-in model's
tokenizer; a stand-in PD flow instead of workers): API keys (401 / UNAUTHENTICATED), per-client
and overall admission limits (429 + Retry-After / RESOURCE_EXHAUSTED), body size limits (413, also
for chunked bodies), invalid UTF-8 and unpaired surrogates, stop lists, absurd n / max_tokens,
and an OpenAPI document that says what the server answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
import httpx
import pytest

import splitserve_sdk as sdk
from services.controller.builtin_model import ensure_builtin_model
from services.gateway.app import Gateway, create_app
from services.gateway.auth import ApiKeyError, ApiKeys
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError
from services.gateway.grpc_api import peer_address, start_grpc_server
from services.ports import free_port
from splitserve_sdk.proto.v1 import inference_pb2 as ipb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as ipb_grpc
from services import cluster_secret
from tests.support.cluster import TEST_SECRET, cache_dir_for_tests
from tests.support.fake_flow import FakeFlow

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"
ENV = "SPLITSERVE_TEST_GUARD_KEYS"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_builtin_model(cache_dir_for_tests(), "tiny")


Factory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Factory:
    """A gateway app (not started: no Redis) whose PD flow is a stand-in."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv(cluster_secret.ENV, TEST_SECRET.text)

    def make(keys: list[str] | None = None, **cfg: Any) -> Gateway:
        if keys:
            monkeypatch.setenv(ENV, ",".join(keys))
        app = create_app(GatewayConfig(model=str(model_dir), served_model_name="m",
                                       redis_url="redis://unused", api_keys_env=ENV, **cfg))
        gw: Gateway = app.state.gateway
        gw.flow = FakeFlow()  # type: ignore[assignment]
        gw.app = app  # type: ignore[attr-defined]
        return gw
    return make


def http(gw: Gateway, client: tuple[str, int] = ("127.0.0.1", 40000),
         key: str | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gw.app, client=client)  # type: ignore[attr-defined]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers)


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --- API keys ---------------------------------------------------------------------------------
def test_keys_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n{KEY_A}  # alpha\n\n")
    monkeypatch.setenv(ENV, f" {KEY_B}, ")
    keys = ApiKeys.load(f, ENV)
    assert keys is not None and len(keys) == 2
    assert keys.check(KEY_A) and keys.check(KEY_B)
    assert not keys.check(KEY_A[:-1]) and not keys.check("") and not keys.check(KEY_A + "x")
    name = keys.client_of(f"Bearer {KEY_A}")
    assert name.startswith("key:") and KEY_A not in name
    assert keys.client_of(f"bearer  {KEY_A} ") == name != keys.client_of(f"Bearer {KEY_B}")
    for header, code in [(None, "missing_api_key"), ("", "missing_api_key"),
                         (f"Basic {KEY_A}", "invalid_api_key"), ("Bearer", "invalid_api_key"),
                         ("Bearer sk-wrong-wrong-wrong", "invalid_api_key")]:
        with pytest.raises(APIError) as info:
            keys.client_of(header)
        assert info.value.status == 401 and info.value.code == code
        assert KEY_A not in info.value.message


def test_key_configuration_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert ApiKeys.load(None, ENV) is None  # no keys: no authentication
    monkeypatch.setenv(ENV, "  ")
    assert ApiKeys.load(None, ENV) is None
    with pytest.raises(ApiKeyError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing", ENV)
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ApiKeyError, match="holds no keys"):
        ApiKeys.load(empty, ENV)
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(ApiKeyError, match="shorter than"):
        ApiKeys.load(None, ENV)


async def test_http_needs_a_key_on_v1_only(make_gateway: Factory) -> None:
    gw = make_gateway(keys=[KEY_A])
    async with http(gw) as anon, http(gw, key="sk-not-a-real-key-000") as wrong, \
            http(gw, key=KEY_A) as good:
        for path in ("/v1/models", "/v1/nowhere"):
            r = await anon.get(path)
            assert_error(r, 401, code="missing_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert_error(await wrong.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(await anon.post("/v1/completions", json={"model": "m", "prompt": "x"}), 401)
        assert (await good.get("/v1/models")).json()["data"][0]["id"] == "m"
        r = await good.post("/v1/completions", json={"model": "m", "prompt": "hi",
                                                     "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0t1t2"
        assert (await anon.get("/metrics")).status_code == 200
        assert (await anon.get("/health")).status_code == 503  # open (no workers here)
        assert (await anon.get("/openapi.json")).status_code == 200


# --- admission limits --------------------------------------------------------------------------
async def _hold(h: httpx.AsyncClient, gw: Gateway) -> tuple[asyncio.Task, int]:
    """Start a streaming request that stays in flight until the flow's pause is set."""
    before = gw.admission.in_flight

    async def run() -> str:
        r = await h.post("/v1/completions", json={"model": "m", "prompt": "hold",
                                                  "max_tokens": 5, "ignore_eos": True,
                                                  "stream": True})
        return r.text
    task = asyncio.create_task(run())
    for _ in range(500):
        if gw.admission.in_flight > before:
            break
        await asyncio.sleep(0.01)
    assert gw.admission.in_flight == before + 1
    return task, before + 1


async def test_per_client_limit_by_key(make_gateway: Factory) -> None:
    gw = make_gateway(keys=[KEY_A, KEY_B], max_in_flight_per_client=1)
    gw.flow.pause.clear()  # type: ignore[attr-defined]
    async with http(gw, key=KEY_A) as a, http(gw, ("127.0.0.1", 40001), key=KEY_A) as a2, \
            http(gw, key=KEY_B) as b:
        held, _ = await _hold(a, gw)
        # the same key from another connection is the same client
        r = await a2.post("/v1/completions", json={"model": "m", "prompt": "x"})
        err = assert_error(r, 429, code="too_many_requests")
        assert r.headers["retry-after"] == "1" and "this client" in err["message"]
        assert err["type"] == "rate_limit_error"
        assert (await b.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                      "max_tokens": 2})).status_code == 200
        gw.flow.pause.set()  # type: ignore[attr-defined]
        assert "data: [DONE]" in await held
        assert gw.admission.in_flight == 0 and gw.admission.by_client == {}
        assert (await a2.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                       "max_tokens": 2})).status_code == 200


async def test_per_client_limit_by_address_and_overall_limit(make_gateway: Factory) -> None:
    gw = make_gateway(max_in_flight=2, max_in_flight_per_client=1)
    async with http(gw, ("10.0.0.1", 1)) as one, http(gw, ("10.0.0.1", 2)) as one_again, \
            http(gw, ("10.0.0.2", 1)) as two, http(gw, ("10.0.0.3", 1)) as three:
        held1, _ = await _hold(one, gw)
        r = await one_again.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert "this client" in assert_error(r, 429)["message"]
        held2, _ = await _hold(two, gw)
        r = await three.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert "the gateway is at its limit of 2" in assert_error(r, 429)["message"]
        assert r.headers["retry-after"] == "1"
        assert (await three.get("/v1/models")).status_code == 200  # not a generation
        gw.flow.pause.set()  # type: ignore[attr-defined]
        await asyncio.gather(held1, held2)
        assert gw.admission.in_flight == 0


# --- body size and encoding --------------------------------------------------------------------
async def test_body_size_limit(make_gateway: Factory) -> None:
    gw = make_gateway(max_body_bytes=4096)
    big = json.dumps({"model": "m", "prompt": "x" * 5000}).encode()
    async with http(gw) as h:
        r = await h.post("/v1/completions", content=big,
                         headers={"content-type": "application/json"})
        assert_error(r, 413, code="request_too_large")
        assert "4096 bytes" in r.json()["error"]["message"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]
        r = await h.post("/v1/completions", content=chunked(),
                         headers={"content-type": "application/json"})
        assert_error(r, 413, code="request_too_large")
        assert gw.admission.in_flight == 0
        ok = json.dumps({"model": "m", "prompt": "xy " * 1000, "max_tokens": 1}).encode()

        async def chunked_ok() -> AsyncIterator[bytes]:
            for i in range(0, len(ok), 1000):
                yield ok[i:i + 1000]
        r = await h.post("/v1/completions", content=chunked_ok(),
                         headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


BAD = [
    # raw bytes that are not UTF-8
    (b'{"model": "m", "prompt": "caf\xe9"}', "/v1/completions", None, "invalid_json"),
    (b'\xff\xfe{\x00}\x00', "/v1/completions", None, "invalid_json"),
    # unpaired surrogates, escaped in valid JSON
    (b'{"model": "m", "prompt": "\\ud800x"}', "/v1/completions", None, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "a\\udfff"}]}',
     "/v1/chat/completions", None, None),
    (b'{"model": "m", "prompt": "x", "stop": ["\\ud83d"]}', "/v1/completions", None, None),
    # absurd values
    (json.dumps({"model": "m", "prompt": "x", "n": 10 ** 30}).encode(), "/v1/completions", "n",
     "unsupported_parameter"),
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": 10 ** 30}).encode(),
     "/v1/completions", "max_tokens", "context_length_exceeded"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                 "max_completion_tokens": 2 ** 40}).encode(), "/v1/chat/completions",
     "max_tokens", "context_length_exceeded"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "/v1/completions", "temperature",
     None),
    (b'{"model": "m", "prompt": "x", "max_tokens": 1e400}', "/v1/completions", "max_tokens",
     None),
    (json.dumps({"model": "m", "prompt": "x", "stop": [f"s{i}" for i in range(17)]}).encode(),
     "/v1/completions", "stop", None),
    (json.dumps({"model": "m", "prompt": "x", "stop": "y" * 257}).encode(), "/v1/completions",
     "stop", None),
    (json.dumps({"model": "m", "prompt": []}).encode(), "/v1/completions", "prompt", None),
    (json.dumps({"model": "m", "prompt": [[]]}).encode(), "/v1/completions", "prompt", None),
    (b"[" * 50000 + b"]" * 50000, "/v1/completions", None, None),  # deep nesting
    (b"", "/v1/chat/completions", None, None),
]


@pytest.mark.parametrize("body,path,param,code", BAD,
                         ids=[f"{i}-{b[:30]!r}" for i, (b, *_) in enumerate(BAD)])
async def test_bad_bodies_get_400(make_gateway: Factory, body: bytes, path: str,
                                  param: str | None, code: str | None) -> None:
    gw = make_gateway()
    async with http(gw) as h:
        r = await h.post(path, content=body, headers={"content-type": "application/json"})
        err = assert_error(r, 400, code=code)
        if param is not None:
            assert (err["param"] or "").startswith(param), err
        assert gw.admission.in_flight == 0


async def test_limits_that_still_pass(make_gateway: Factory) -> None:
    gw = make_gateway(max_stop_sequences=4)
    async with http(gw) as h:
        for body in [{"model": "m", "prompt": "x\u0000y", "max_tokens": 2},
                     {"model": "m", "prompt": "emoji \U0001F600", "max_tokens": 2,
                      "stop": ["a", "b", "c", "y" * 256]}]:
            r = await h.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
        r = await h.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                  "stop": list("abcde")})
        assert "at most 4" in assert_error(r, 400, param="stop")["message"]


# --- OpenAPI ------------------------------------------------------------------------------------
async def test_openapi_documents_the_real_answers(make_gateway: Factory) -> None:
    gw = make_gateway()
    async with http(gw) as h:
        spec = (await h.get("/openapi.json")).json()
    comps = spec["components"]["schemas"]
    assert "HTTPValidationError" not in comps and "ErrorResponse" in comps
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "429", "503"}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "422" not in spec["paths"]["/v1/models"]["get"]["responses"]


# --- gRPC -------------------------------------------------------------------------------------
def test_peer_address() -> None:
    assert peer_address("ipv4:127.0.0.1:5050") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5050") == "::1"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"


async def test_grpc_needs_a_key_and_keeps_per_client_limits(make_gateway: Factory) -> None:
    gw = make_gateway(keys=[KEY_A, KEY_B], max_in_flight_per_client=1)
    port = free_port()
    server = await start_grpc_server(gw, "127.0.0.1", port)
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = ipb_grpc.InferenceStub(ch)
            chat = ipb.ChatRequest(model="m", messages=[ipb.ChatMessage(role="user",
                                                                        content="hi")],
                                   sampling=ipb.SamplingParams(max_tokens=3))
            for md in [(), (("authorization", "Bearer sk-wrong-wrong-wrong"),)]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    _ = [c async for c in stub.Chat(chat, metadata=md)]
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ListModels(ipb.ListModelsRequest(), metadata=md)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.Health(ipb.HealthRequest())  # open
            a = (("authorization", f"Bearer {KEY_A}"),)
            chunks = [c async for c in stub.Chat(chat, metadata=a)]
            assert "".join(c.text for c in chunks) == "t0t1t2"
            held = stub.Complete(ipb.CompleteRequest(
                model="m", text="hold", sampling=ipb.SamplingParams(max_tokens=5,
                                                                    ignore_eos=True)),
                metadata=a)
            assert (await held.read()).text == "t0"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in stub.Chat(chat, metadata=a)]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this client" in info.value.details()
            b = (("authorization", f"Bearer {KEY_B}"),)
            assert len([c async for c in stub.Chat(chat, metadata=b)]) == 3
            held.cancel()
            too_big = ipb.CompleteRequest(model="m", text="x" * (2 << 20))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in stub.Complete(too_big, metadata=b)]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the SDK's token and its exception for this status
        async with sdk.AsyncClient(target, model="m", retries=0) as anon:
            with pytest.raises(sdk.Unauthenticated):
                await anon.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        async with sdk.AsyncClient(target, model="m", retries=0, token=KEY_B) as c:
            assert (await c.chat([{"role": "user", "content": "hi"}], max_tokens=2)).text
    finally:
        await server.stop(0)


# --- request counting --------------------------------------------------------------------------
async def test_a_streamed_request_counts_in_flight_until_its_last_event(make_gateway) -> None:
    gw = make_gateway()
    flow: FakeFlow = gw.flow  # type: ignore[assignment]
    gauge, requests = gw.metrics.in_flight, gw.metrics.requests
    seen: list[float] = []

    async def look_then_release() -> None:
        await asyncio.sleep(0.5)  # the stream is paused after its third chunk
        seen.append(gauge._value.get())
        flow.pause.set()

    async with http(gw) as c:
        task = asyncio.create_task(look_then_release())
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5,
                                                   "stream": True, "ignore_eos": True})
        await task
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert seen == [1], "a stream in progress was not counted in flight"
    assert gauge._value.get() == 0
    assert requests.labels("/v1/completions", "200")._value.get() == 1
