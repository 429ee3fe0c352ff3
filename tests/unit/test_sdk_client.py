"""The SDK's clients against an in-process fake gateway: results, errors as exceptions with
their status code, deadlines, retries (only on UNAVAILABLE, only before anything streamed),
the auth token in metadata."""

from __future__ import annotations

import time

import grpc
import pytest

import splitserve_sdk as sdk
from services.ports import free_port
from tests.support.fake_inference import FakeServer


@pytest.fixture
def server():
    with FakeServer(free_port()) as s:
        yield s


def test_chat_streams_chunks_and_collects_a_result(server: FakeServer) -> None:
    with sdk.Client(server.target) as c:
        chunks = list(c.stream_chat([{"role": "user", "content": "one two three"}]))
        assert [ch.text for ch in chunks] == ["one ", "two ", "three ", ""]
        assert isinstance(chunks[0], sdk.Chunk) and chunks[0].finish_reason is None
        assert chunks[-1].finish_reason == "stop"
        assert chunks[-1].usage == sdk.Usage(3, 3, 6, 0)
        result = c.chat([("user", "a b")], max_tokens=5, temperature=0, seed=1, stop=["x"])
        assert isinstance(result, sdk.Completion)
        assert result.text == "a b " and result.token_ids == (0, 1)
        assert result.finish_reason == "stop" and result.usage.completion_tokens == 2
        assert result.id == "fake-1"


def test_generate_text_and_token_ids(server: FakeServer) -> None:
    with sdk.Client(server.target, model="fake") as c:
        assert c.generate("hello world").text == "hello world "
        assert c.generate([7, 8]).text == "7 8 "
        assert [ch.text for ch in c.stream_generate("x y")][:2] == ["x ", "y "]


def test_models_and_health(server: FakeServer) -> None:
    with sdk.Client(server.target) as c:
        assert c.models() == [sdk.ModelInfo("fake", 128, "tests")]
        h = c.health()
        assert h.serving and h.status == "SERVING" and h.workers == {"prefill": 1, "decode": 1}


@pytest.mark.parametrize("text,exc,code", [
    ("invalid", sdk.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    ("notfound", sdk.NotFound, grpc.StatusCode.NOT_FOUND),
    ("busy", sdk.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("unavailable", sdk.Unavailable, grpc.StatusCode.UNAVAILABLE),
    ("deadline", sdk.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_errors_carry_their_status_code(server: FakeServer, text: str, exc: type,
                                        code: grpc.StatusCode) -> None:
    with sdk.Client(server.target, model="fake", retries=2, backoff=0.01) as c:
        with pytest.raises(exc) as info:
            c.chat([("user", text)])
    assert isinstance(info.value, sdk.SplitserveError)
    assert info.value.code == code and info.value.message == f"fake {text}"
    # only UNAVAILABLE is retried
    assert server.servicer.calls == (3 if code == grpc.StatusCode.UNAVAILABLE else 1)


def test_unavailable_after_streaming_is_not_retried(server: FakeServer) -> None:
    got = []
    with sdk.Client(server.target, model="fake", retries=5, backoff=0.01) as c:
        with pytest.raises(sdk.Unavailable, match="worker lost"):
            for ch in c.stream_chat([("user", "a FAIL b")]):
                got.append(ch.text)
    assert got == ["a ", "FAIL "]
    assert server.servicer.calls == 1


def test_deadline_per_call_and_default(server: FakeServer) -> None:
    with sdk.Client(server.target, model="fake") as c:
        start = time.monotonic()
        with pytest.raises(sdk.DeadlineExceeded) as info:
            c.chat([("user", "slow")], timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 5
    with sdk.Client(server.target, model="fake", timeout=0.3) as c:
        with pytest.raises(sdk.DeadlineExceeded):
            c.generate("slow")
        assert c.generate("fast enough").text == "fast enough "


def test_abandoning_a_stream_cancels_the_call(server: FakeServer) -> None:
    with sdk.Client(server.target, model="fake") as c:
        it = c.stream_chat([("user", "a PAUSE b")])
        assert next(it).text == "a "
        assert next(it).text == "PAUSE "
        it.close()
    deadline = time.monotonic() + 5
    while server.servicer.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.servicer.cancelled == 1


def test_auth_token_is_sent_as_bearer_metadata(server: FakeServer) -> None:
    with sdk.Client(server.target, token="s3cret") as c:
        c.chat([("user", "hi")])
    assert all(m.get("authorization") == "Bearer s3cret" for m in server.servicer.metadata)
    assert len(server.servicer.metadata) == 2  # ListModels (default model), Chat


def test_retries_until_a_late_gateway_is_up() -> None:
    port = free_port()
    with FakeServer(port, delay=1.5) as s:
        start = time.monotonic()
        with sdk.Client(s.target, model="fake", retries=30, backoff=0.05, max_backoff=0.3) as c:
            assert c.chat([("user", "finally here")]).text == "finally here "
        assert time.monotonic() - start >= 1.4


def test_no_retries_fails_fast_when_nothing_listens() -> None:
    with sdk.Client(f"127.0.0.1:{free_port()}", model="fake", retries=0) as c:
        with pytest.raises(sdk.Unavailable):
            c.chat([("user", "anyone?")], timeout=5)


def test_retries_stop_at_the_deadline() -> None:
    with sdk.Client(f"127.0.0.1:{free_port()}", model="fake", retries=1000, backoff=0.05) as c:
        start = time.monotonic()
        with pytest.raises((sdk.Unavailable, sdk.DeadlineExceeded)):
            c.chat([("user", "anyone?")], timeout=1.0)
        assert time.monotonic() - start < 3


def test_tls_options_build_secure_credentials() -> None:
    c = sdk.Client("127.0.0.1:1", tls=True)
    assert c.options.credentials() is not None
    c.close()
    c = sdk.Client("127.0.0.1:1")
    assert c.options.credentials() is None
    c.close()


# --- asyncio client -------------------------------------------------------------------------
async def test_async_client_streams_and_collects(server: FakeServer) -> None:
    async with sdk.AsyncClient(server.target, token="t") as c:
        assert [m.id for m in await c.models()] == ["fake"]
        assert (await c.health()).serving
        texts = [ch.text async for ch in c.stream_chat([("user", "x y")])]
        assert texts == ["x ", "y ", ""]
        r = await c.generate("p q")
        assert r.text == "p q " and r.usage.total_tokens == 5
    assert server.servicer.metadata[-1]["authorization"] == "Bearer t"


async def test_async_client_errors_and_deadlines(server: FakeServer) -> None:
    async with sdk.AsyncClient(server.target, model="fake", backoff=0.01) as c:
        with pytest.raises(sdk.NotFound):
            await c.chat([("user", "notfound")])
        with pytest.raises(sdk.DeadlineExceeded):
            await c.chat([("user", "slow")], timeout=0.3)
        with pytest.raises(sdk.Unavailable):
            await c.generate("a FAIL b")


async def test_async_client_retries_until_a_late_gateway_is_up() -> None:
    with FakeServer(free_port(), delay=1.5) as s:
        async with sdk.AsyncClient(s.target, model="fake", retries=30, backoff=0.05,
                                   max_backoff=0.3) as c:
            assert (await c.chat([("user", "late")])).text == "late "
