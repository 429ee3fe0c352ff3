"""The gateway's input guard on its real front end (vLLM's OpenAI app with the gateway's
middleware, the gRPC API, a real Redis registry; a scripted engine core instead of workers,
tests/support/frontend.py): API keys (401 / UNAUTHENTICATED), per-client and overall admission
limits (429 + Retry-After / RESOURCE_EXHAUSTED), body size limits (413, also for chunked
bodies), bodies that are not JSON, request counting, and an OpenAPI document that says how
errors are answered. Nothing refused reaches the engine core."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc
import httpx
import pytest

import splitserve_sdk as sdk
from services import cluster_secret
from services.controller.builtin_model import ensure_builtin_model
from services.gateway.admission import Admission
from services.gateway.auth import ApiKeyError, ApiKeys
from services.gateway.errors import APIError
from services.gateway.grpc_api import peer_address
from services.gateway.http_guard import LINGER_S, GuardMiddleware
from services.ports import free_port
from splitserve_sdk.proto.v1 import inference_pb2 as ipb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as ipb_grpc
from tests.support.cluster import TEST_SECRET, cache_dir_for_tests
from tests.support.frontend import Frontend, frontend
from tests.support.redis import RedisServer

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"
ENV = "SPLITSERVE_TEST_GUARD_KEYS"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_builtin_model(cache_dir_for_tests(), "tiny")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv(cluster_secret.ENV, TEST_SECRET.text)
    yield monkeypatch


def started(model_dir: Path, redis_srv: RedisServer, env: pytest.MonkeyPatch,
            keys: list[str] | None = None, **cfg: object):
    if keys:
        env.setenv(ENV, ",".join(keys))
    return frontend(str(model_dir), redis_srv.url, api_keys_env=ENV, **cfg)  # type: ignore


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 3}


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


async def test_http_needs_a_key_except_on_probes_and_metrics(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env, keys=[KEY_A]) as fe:
        async with fe.http() as anon, fe.http(key="sk-not-a-real-key-000") as wrong, \
                fe.http(key=KEY_A) as good:
            for path in ("/v1/models", "/v1/nowhere", "/tokenize"):
                r = await (anon.get(path) if path != "/tokenize" else
                           anon.post(path, json={"model": "m", "prompt": "x"}))
                assert_error(r, 401, code="missing_api_key")
                assert r.headers["www-authenticate"] == "Bearer"
            assert_error(await wrong.get("/v1/models"), 401, code="invalid_api_key")
            assert_error(await anon.post("/v1/completions", json=COMPLETION), 401)
            assert fe.core.requests == []
            assert (await good.get("/v1/models")).json()["data"][0]["id"] == "m"
            r = await good.post("/v1/completions", json=COMPLETION)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            assert (await anon.get("/metrics")).status_code == 200
            assert (await anon.get("/health")).status_code == 200  # open
            assert_error(await anon.get("/openapi.json"), 401)
            assert (await good.get("/openapi.json")).status_code == 200


# --- admission limits --------------------------------------------------------------------------
async def _hold(h: httpx.AsyncClient, fe: Frontend) -> asyncio.Task:
    """Start a streaming request that stays in flight until the core's `release` is set."""
    admission = fe.gateway.admission
    before = admission.in_flight

    async def run() -> str:
        r = await h.post("/v1/completions", json={"model": "m", "prompt": "hold",
                                                  "max_tokens": 5, "ignore_eos": True,
                                                  "stream": True})
        return r.text
    task = asyncio.create_task(run())
    for _ in range(500):
        if admission.in_flight > before:
            break
        await asyncio.sleep(0.01)
    assert admission.in_flight == before + 1
    return task


async def test_per_client_limit_by_key(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env, keys=[KEY_A, KEY_B],
                       max_in_flight_per_client=1) as fe:
        admission = fe.gateway.admission
        async with fe.http(key=KEY_A) as a, fe.http(KEY_A, ("127.0.0.1", 40001)) as a2, \
                fe.http(key=KEY_B) as b:
            held = await _hold(a, fe)
            # the same key from another connection is the same client
            r = await a2.post("/v1/completions", json=COMPLETION)
            err = assert_error(r, 429, code="too_many_requests")
            assert r.headers["retry-after"] == "1" and "this client" in err["message"]
            assert err["type"] == "rate_limit_error"
            assert (await b.post("/v1/completions", json=COMPLETION)).status_code == 200
            fe.core.release.set()
            assert "data: [DONE]" in await held
            assert admission.in_flight == 0 and admission.by_client == {}
            assert (await a2.post("/v1/completions", json=COMPLETION)).status_code == 200
            assert len(fe.core.requests) == 3  # the refused one never reached the core


async def test_per_client_limit_by_address_and_overall_limit(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env, max_in_flight=2,
                       max_in_flight_per_client=1) as fe:
        async with fe.http(client=("10.0.0.1", 1)) as one, \
                fe.http(client=("10.0.0.1", 2)) as one_again, \
                fe.http(client=("10.0.0.2", 1)) as two, fe.http(client=("10.0.0.3", 1)) as three:
            held1 = await _hold(one, fe)
            r = await one_again.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert "this client" in assert_error(r, 429)["message"]
            held2 = await _hold(two, fe)
            r = await three.post("/v1/completions", json=COMPLETION)
            assert "the gateway is at its limit of 2" in assert_error(r, 429)["message"]
            assert r.headers["retry-after"] == "1"
            assert (await three.get("/v1/models")).status_code == 200  # not a generation
            fe.core.release.set()
            await asyncio.gather(held1, held2)
            assert fe.gateway.admission.in_flight == 0


# --- bodies --------------------------------------------------------------------------------
async def test_body_size_limit(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env, max_body_bytes=4096) as fe:
        big = json.dumps({"model": "m", "prompt": "x" * 5000}).encode()
        async with fe.http() as h:
            r = await h.post("/v1/completions", content=big,
                             headers={"content-type": "application/json"})
            assert_error(r, 413, code="request_too_large")
            assert "4096 bytes" in r.json()["error"]["message"]

            async def chunked(body: bytes) -> AsyncIterator[bytes]:  # no Content-Length
                for i in range(0, len(body), 1000):
                    yield body[i:i + 1000]
            r = await h.post("/v1/completions", content=chunked(big),
                             headers={"content-type": "application/json"})
            assert_error(r, 413, code="request_too_large")
            assert fe.gateway.admission.in_flight == 0 and fe.core.requests == []
            ok = json.dumps({"model": "m", "prompt": "xy " * 1000, "max_tokens": 1}).encode()
            r = await h.post("/v1/completions", content=chunked(ok),
                             headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text


def _post_raw(port: int, headers: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request over a plain socket, all of its body, then read the answer to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"
                  b"Content-Type: application/json\r\n" + headers + b"\r\n")
        for part in body_parts:
            s.sendall(part)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


async def test_an_oversized_body_gets_its_413_not_a_reset() -> None:
    # Answering 413 and closing while the client still sends leaves unread bytes in the
    # server's socket, and the kernel resets the connection: a client that has not read the
    # answer yet sees `Connection reset by peer` (seen in CI on a 2 MiB body). The guard reads
    # on (and drops) what is sent within its linger bounds, so the client gets its 413.
    import uvicorn

    async def app(scope, receive, send):  # never reached: every request here is refused
        raise AssertionError("the app ran")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(GuardMiddleware(app, Admission(4), None, 4096),
                                           host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        body = b"x" * (16 << 20)
        pieces = [body[i:i + (64 << 10)] for i in range(0, len(body), 64 << 10)]
        for headers, parts in [
                (b"Content-Length: %d\r\n" % len(body), pieces),
                (b"Transfer-Encoding: chunked\r\n",
                 [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"])]:
            answer = await asyncio.to_thread(_post_raw, port, headers, parts)
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), head
            assert b"connection: close" in head.lower()
            assert json.loads(payload)["error"]["code"] == "request_too_large"
        # a client that stops sending gets its 413 once the linger time is up
        stalled = b"Content-Length: %d\r\n" % len(body)
        started_at = asyncio.get_running_loop().time()
        answer = await asyncio.to_thread(_post_raw, port, stalled, pieces[:2])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        waited = asyncio.get_running_loop().time() - started_at
        assert LINGER_S - 0.1 <= waited < LINGER_S + 10, waited
    finally:
        server.should_exit = True
        await task


BAD = [
    (b'{"model": "m", "prompt": "caf\xe9"}', "/v1/completions"),  # not UTF-8
    (b'\xff\xfe{\x00}\x00', "/v1/completions"),
    (b'{"model": "m", "prompt": ', "/v1/completions"),  # not JSON
    (b'[1, 2]', "/v1/chat/completions"),  # not an object
    (b"[" * 50000 + b"]" * 50000, "/v1/completions"),  # deep nesting
    (b"", "/v1/chat/completions"),
]


@pytest.mark.parametrize("body,path", BAD, ids=[f"{i}" for i in range(len(BAD))])
async def test_bodies_that_are_not_a_json_object_get_400(model_dir, redis_srv, env,
                                                         body: bytes, path: str) -> None:
    async with started(model_dir, redis_srv, env) as fe:
        async with fe.http() as h:
            r = await h.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"], r.text
            assert fe.gateway.admission.in_flight == 0 and fe.core.requests == []


# --- OpenAPI ------------------------------------------------------------------------------------
async def test_openapi_documents_the_error_answers(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env) as fe:
        async with fe.http() as h:
            spec = (await h.get("/openapi.json")).json()
    comps = spec["components"]["schemas"]
    assert comps["ErrorInfo"]["properties"]["code"]["anyOf"] == [{"type": "integer"},
                                                                 {"type": "string"}]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize"):
        for operation in spec["paths"][path].values():
            error = operation["responses"]["default"]["content"]["application/json"]
            assert error["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


# --- gRPC -------------------------------------------------------------------------------------
def test_peer_address() -> None:
    assert peer_address("ipv4:127.0.0.1:5050") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5050") == "::1"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"


async def test_grpc_needs_a_key_and_keeps_per_client_limits(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env, keys=[KEY_A, KEY_B],
                       max_in_flight_per_client=1) as fe:
        target = await fe.grpc(free_port())
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
            health = await stub.Health(ipb.HealthRequest())  # open
            assert health.status == ipb.HealthResponse.SERVING
            a = (("authorization", f"Bearer {KEY_A}"),)
            chunks = [c async for c in stub.Chat(chat, metadata=a)]
            assert sum(len(c.token_ids) for c in chunks) == 3
            held = stub.Complete(ipb.CompleteRequest(
                model="m", text="hold", sampling=ipb.SamplingParams(max_tokens=5,
                                                                    ignore_eos=True)),
                metadata=a)
            assert (await held.read()).token_ids
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in stub.Chat(chat, metadata=a)]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this client" in info.value.details()
            b = (("authorization", f"Bearer {KEY_B}"),)
            assert sum(len(c.token_ids) for c in [c async for c in stub.Chat(chat, metadata=b)]
                       ) == 3
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
        for _ in range(100):  # the cancelled call's request is aborted in the core
            if fe.core.aborted:
                break
            await asyncio.sleep(0.05)
        assert len(fe.core.aborted) == 1 and fe.core.in_flight == 0


# --- request counting --------------------------------------------------------------------------
async def test_a_streamed_request_is_counted_and_timed(model_dir, redis_srv,
                                                                        env) -> None:
    async with started(model_dir, redis_srv, env) as fe:
        gauge, requests = fe.gateway.metrics.in_flight, fe.gateway.metrics.requests
        seen: list[float] = []

        async def look_then_release() -> None:
            await asyncio.sleep(0.5)  # the stream is paused after its third token
            seen.append(gauge._value.get())
            fe.core.release.set()

        async with fe.http() as c:
            task = asyncio.create_task(look_then_release())
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi",
                                                       "max_tokens": 5, "stream": True,
                                                       "ignore_eos": True})
            await task
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert seen == [1], "a stream in progress was not counted in flight"
        assert gauge._value.get() == 0
        assert requests.labels("/v1/completions", "200")._value.get() == 1
        # the request's figures, as vLLM's output processor measured them in the front end
        m = fe.gateway.metrics

        def count(histogram: object) -> float:
            return next(s.value for f in histogram.collect() for s in f.samples  # type: ignore
                        if s.name.endswith("_count"))
        assert (count(m.ttft), count(m.e2e)) == (1, 1) and count(m.itl) == 4
        assert m.completion_tokens._value.get() == 5 and m.prompt_tokens._value.get() >= 1


def test_json_nesting_is_measured_not_guessed() -> None:
    from services.gateway.http_guard import MAX_JSON_DEPTH, too_deep

    deep = MAX_JSON_DEPTH
    assert not too_deep(b"[" * deep + b"]" * deep)
    assert too_deep(b"[" * (deep + 1) + b"]" * (deep + 1))
    assert too_deep(b"{\"a\":" * 5000 + b"1" + b"}" * 5000)  # past the parser's own limit
    assert not too_deep(b"[" + b"[1]," * 5000 + b"[1]]")  # many brackets, shallow
    assert not too_deep(b"[" * 300 + b"not json")


# --- no workers ---------------------------------------------------------------------------------
async def test_no_live_worker_is_503_and_unavailable_at_once(model_dir, redis_srv, env) -> None:
    """Not vLLM's 500 for a request no engine took: 503 no_workers with Retry-After (HTTP) and
    UNAVAILABLE (gRPC) at once when no worker serves and none is coming; /health tells the
    readiness probe; what needs no worker still answers."""
    import time

    async with started(model_dir, redis_srv, env, workers=False) as fe:
        async with fe.http() as h:
            for path, body in (("/v1/completions", COMPLETION),
                               ("/v1/chat/completions", {
                                   "model": "m", "messages": [{"role": "user", "content": "x"}],
                                   "max_tokens": 2, "stream": True})):
                r = await h.post(path, json=body)
                assert_error(r, 503, code="no_workers")
                assert r.headers["retry-after"]
            assert (await h.get("/v1/models")).status_code == 200
            assert_error(await h.get("/health"), 503, code="no_workers")
        target = await fe.grpc(free_port())
        async with sdk.AsyncClient(target, model="m", retries=0) as c:
            assert not (await c.health()).serving
            start = time.monotonic()
            with pytest.raises(sdk.Unavailable) as info:
                await c.chat([{"role": "user", "content": "x"}], max_tokens=2)
            assert info.value.message and time.monotonic() - start < 5
        assert fe.core.requests == [] and fe.gateway.admission.in_flight == 0


async def test_the_overall_limit_over_grpc(model_dir, redis_srv, env) -> None:
    async with started(model_dir, redis_srv, env, max_in_flight=1) as fe:
        target = await fe.grpc(free_port())
        async with sdk.AsyncClient(target, model="m", retries=0) as c:
            held = c.stream_generate("hold", max_tokens=5, ignore_eos=True)
            assert (await held.__anext__()).token_ids
            with pytest.raises(sdk.ResourceExhausted, match="limit of 1"):
                await c.chat([{"role": "user", "content": "x"}], max_tokens=2)
            fe.core.release.set()
            assert len([c async for c in held]) >= 1
            assert (await c.chat([{"role": "user", "content": "x"}], max_tokens=2)).text
