"""The gateway's TTFT, inter-token and end-to-end histograms on its HTTP front end (a gateway
app with a stand-in PD flow): TTFT runs from the request's arrival, tokenizing included, to
the first chunk that carries a token."""

from __future__ import annotations

import asyncio
from typing import Any

from services.proto.v1 import worker_pb2 as wpb
from tests.support.fake_flow import FakeFlow
from tests.unit.test_gateway_guard import Factory, http, make_gateway, model_dir  # noqa: F401

ROUTE = {"route": "/v1/chat/completions"}
TTFT = "splitserve_gateway_time_to_first_token_seconds"
ITL = "splitserve_gateway_inter_token_latency_seconds"
E2E = "splitserve_gateway_request_duration_seconds"
TOKENIZE_S = 0.05


def observed(gw: Any, name: str, what: str = "count") -> float:
    return gw.metrics.registry.get_sample_value(f"{name}_{what}", ROUTE) or 0.0


class SlowTokenizer:
    """The gateway's prompt builder, TOKENIZE_S slower."""

    def __init__(self, builder: Any) -> None:
        self._builder = builder

    async def chat(self, messages: Any) -> list[int]:
        await asyncio.sleep(TOKENIZE_S)
        return await self._builder.chat(messages)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._builder, name)


class EmptyFirstChunk(FakeFlow):
    """Streams a chunk without a token first (as an engine step can), then FakeFlow's."""

    async def stream(self, request_id: str, token_ids: list[int], sampling: Any, result: Any):
        yield wpb.GenerateChunk(token_ids=[], text="")
        async for chunk in super().stream(request_id, token_ids, sampling, result):
            yield chunk


def chat_body(stream: bool, max_tokens: int = 5) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": stream}


async def test_ttft_starts_at_arrival_and_itl_counts_the_gaps(make_gateway: Factory) -> None:
    gw = make_gateway()
    gw.builder = SlowTokenizer(gw.builder)  # type: ignore[assignment]
    async with http(gw) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=True))
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert observed(gw, TTFT) == 1 and observed(gw, TTFT, "sum") >= TOKENIZE_S
        assert observed(gw, ITL) == 4  # 5 chunks with a token each: 4 gaps
        assert observed(gw, E2E) == 1 and observed(gw, E2E, "sum") >= observed(gw, TTFT, "sum")
        r = await c.post("/v1/chat/completions", json=chat_body(stream=False))
        assert r.status_code == 200
        assert observed(gw, TTFT) == 2 and observed(gw, TTFT, "sum") >= 2 * TOKENIZE_S
        assert observed(gw, E2E) == 2


async def test_ttft_waits_for_the_first_chunk_with_a_token(make_gateway: Factory) -> None:
    gw = make_gateway()
    gw.flow = EmptyFirstChunk()  # type: ignore[assignment]
    async with http(gw) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=3))
        assert r.status_code == 200
        texts = [ln for ln in r.text.splitlines() if ln.startswith("data: {")]
        assert sum('"content":"t' in ln for ln in texts) == 3
    assert observed(gw, TTFT) == 1
    assert observed(gw, ITL) == 2  # the gaps between the 3 chunks with a token
