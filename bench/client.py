"""The load runner: sends a workload to an OpenAI-compatible server and times every request.

Each request is streamed (`stream: true`, `stream_options.include_usage: true`) with greedy
sampling and `ignore_eos` (a splitserve extension vLLM's server shares), so every request
generates exactly its `max_tokens`. Per request it records:

- TTFT: from sending the request to the first chunk that carries content (text),
- ITLs: the gaps between consecutive content chunks,
- end-to-end latency: from sending to the end of the stream (`data: [DONE]`),
- output tokens: `usage.completion_tokens` of the final chunk (content chunks if absent),
- errors: a non-200 answer, an error event inside the stream, a stream that ends without
  `[DONE]`, a transport error, or a request cut off by the run's time limit.

Concurrency is bounded by a semaphore (requests acquire it in arrival order); an optional
request rate spaces sends with seeded exponential gaps (a Poisson process). A request with
`after` (a conversation's next turn) waits until that request finished; one with `arrival_s`
(open-loop scenarios) is not sent before that many seconds into the run. The whole run is
bounded by `max_seconds`: then unsent requests are dropped and in-flight ones cancelled.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import grpc
import httpx
from pydantic import BaseModel, Field

from bench.workload import BenchRequest, Workload

DEADLINE_ERROR = "cancelled: the run reached --max-seconds"


class ClientConfig(BaseModel):
    """How the runner talks to the server."""

    base_url: str = Field(description="server root, e.g. http://127.0.0.1:8000 (a /v1 suffix "
                                      "is accepted)")
    model: str | None = Field(None, description="model name; default: the first of /v1/models")
    api_key: str | None = Field(None, description="sent as a bearer token when set")
    concurrency: int = Field(8, ge=1, description="most requests in flight at once")
    request_rate: float | None = Field(None, gt=0, description="mean requests per second "
                                       "(Poisson arrivals); None: as fast as concurrency allows")
    max_seconds: float = Field(600.0, gt=0, description="hard limit on the run's duration")
    request_timeout_s: float = Field(300.0, gt=0, description="limit per request")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")
    ignore_eos: bool = Field(True, description="generate exactly max_tokens (no early EOS)")
    seed: int = Field(0, description="seed of the arrival process when request_rate is set")
    api: Literal["http", "grpc"] = Field("http", description=(
        "http: OpenAI endpoint with SSE; grpc: splitserve.v1.Inference streaming (same "
        "workload, same sampling; needs grpc_target)"))
    grpc_target: str | None = Field(None, description="host:port of the gateway's gRPC API")
    cache_salt: str | None = Field(None, description=(
        "vLLM's cache_salt on every request (HTTP): runs with different salts share no "
        "cached prefix, so several runs can take turns on the same engines"))

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class RequestResult:
    """What happened to one request (times in seconds)."""

    index: int
    conversation: int = 0
    turn: int = 0
    tag: str = ""
    ok: bool = False
    status: int | None = None
    error: str | None = None
    sent_at: float = 0.0
    """seconds after the run started"""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    content_chunks: int = 0
    worker: str | None = None
    """the worker that computed the prompt (the prefill worker when the KV moved, else the
    decode worker), from the gateway's route headers (None: the server sends none)"""
    predicted_cached_tokens: int | None = None
    """the router's prediction of `cached_tokens` (route headers of an audited request)"""

    def text_chunk(self, start: float, last: float | None) -> float:
        """Record a chunk carrying text (TTFT for the first, an ITL gap after); returns its
        arrival time, the next call's `last`."""
        now = time.perf_counter()
        if last is None:
            self.ttft_s = now - start
        else:
            self.itl_s.append(now - last)
        self.content_chunks += 1
        return now


@dataclass
class RunResult:
    """Every request's result and the run's wall time."""

    results: list[RequestResult]
    wall_s: float
    """from the first send to the last request's end"""
    unsent: int
    """requests never sent (the run hit max_seconds first)"""
    model: str


class Pacer:
    """Spaces sends by exponential gaps of mean 1/rate (no spacing without a rate)."""

    def __init__(self, rate: float | None, seed: int) -> None:
        self.rate = rate
        self.rng = random.Random(f"{seed}:arrivals")
        self.next_at: float | None = None

    async def wait(self) -> None:
        if self.rate is None:
            return
        now = time.perf_counter()
        if self.next_at is None:
            self.next_at = now
        slot = max(now, self.next_at)
        self.next_at = slot + self.rng.expovariate(self.rate)
        if slot > now:
            await asyncio.sleep(slot - now)


def _error_text(status: int, body: bytes) -> str:
    try:
        obj = json.loads(body)
        msg = obj.get("error", {}).get("message") if isinstance(obj, dict) else None
    except (ValueError, AttributeError):
        msg = None
    return f"HTTP {status}: {msg or body[:200].decode(errors='replace')}"


async def discover_model(http: httpx.AsyncClient) -> str:
    """The first model the server lists."""
    r = await http.get("/v1/models")
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError("the server lists no models")
    return str(data[0]["id"])


def note_route(result: RequestResult, headers: httpx.Headers) -> None:
    """The route a gateway with route headers on (`--route-headers`) reports."""
    prefill = headers.get("x-splitserve-prefill-worker")
    result.worker = (prefill if prefill and prefill != "local"
                     else headers.get("x-splitserve-decode-worker"))
    predicted = headers.get("x-splitserve-predicted-cached-tokens")
    result.predicted_cached_tokens = int(predicted) if predicted and predicted.isdigit() \
        else None


async def send(http: httpx.AsyncClient, req: BenchRequest, cfg: ClientConfig, model: str,
               result: RequestResult) -> None:
    """Send one streaming request and fill `result` (never raises for server errors)."""
    body: dict[str, Any] = {"model": model, **req.payload(), "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature, "ignore_eos": cfg.ignore_eos}
    if cfg.cache_salt:
        body["cache_salt"] = cfg.cache_salt
    path = "/v1/chat/completions" if req.api == "chat" else "/v1/completions"
    start = time.perf_counter()
    last: float | None = None
    done = False
    usage_tokens: int | None = None
    try:
        async with http.stream("POST", path, json=body) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = _error_text(resp.status_code, await resp.aread())
                return
            note_route(result, resp.headers)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    result.error = f"error event: {err.get('message', err)}" if isinstance(
                        err, dict) else f"error event: {err}"
                    break
                if usage := obj.get("usage"):
                    usage_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens")
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if req.api == "chat" \
                        else choice.get("text")
                    if text:
                        last = result.text_chunk(start, last)
        result.e2e_s = time.perf_counter() - start
        if result.error is None and not done:
            result.error = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    except json.JSONDecodeError as exc:
        result.error = f"malformed event: {exc}"
    result.output_tokens = usage_tokens if usage_tokens is not None else result.content_chunks
    result.ok = result.error is None


async def send_grpc(stub: Any, req: BenchRequest, cfg: ClientConfig, model: str,
                    result: RequestResult) -> None:
    """As `send`, over the public gRPC API: TTFT is the first chunk with text, ITLs the gaps
    between text chunks, output tokens the final chunk's usage."""
    from splitserve_sdk.proto.v1 import inference_pb2 as ipb

    sampling = ipb.SamplingParams(max_tokens=req.max_tokens, temperature=cfg.temperature,
                                  ignore_eos=cfg.ignore_eos)
    if req.messages is not None:
        call = stub.Chat(ipb.ChatRequest(
            model=model, sampling=sampling,
            messages=[ipb.ChatMessage(role=r, content=c) for r, c in req.messages]),
            timeout=cfg.request_timeout_s)
    else:
        call = stub.Complete(ipb.CompleteRequest(model=model, text=req.prompt or "",
                                                 sampling=sampling),
                             timeout=cfg.request_timeout_s)
    start = time.perf_counter()
    last: float | None = None
    usage_tokens: int | None = None
    finished = False
    try:
        async for chunk in call:
            if chunk.text:
                last = result.text_chunk(start, last)
            if chunk.HasField("usage"):
                usage_tokens = chunk.usage.completion_tokens
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.cached_tokens = chunk.usage.cached_tokens
            if chunk.finish_reason:
                finished = True
        result.status = 0
        result.e2e_s = time.perf_counter() - start
        if not finished:
            result.error = "the stream ended without a finish reason"
    except grpc.aio.AioRpcError as exc:
        result.status = exc.code().value[0]
        result.error = f"gRPC {exc.code().name}: {exc.details()}"
    finally:
        call.cancel()
    result.output_tokens = usage_tokens if usage_tokens is not None else result.content_chunks
    result.ok = result.error is None


async def run_workload(workload: Workload, cfg: ClientConfig,
                       on_result: Callable[[RequestResult], None] | None = None) -> RunResult:
    """Send every request of `workload` under `cfg`'s limits; results in workload order."""
    limits = httpx.Limits(max_connections=cfg.concurrency,
                          max_keepalive_connections=cfg.concurrency)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=cfg.root, limits=limits, timeout=timeout,
                                 headers=headers, trust_env=False) as http:
        model = cfg.model or await discover_model(http)
        channel = None
        if cfg.api == "grpc":
            from splitserve_sdk.proto.v1 import inference_pb2_grpc as ipb_grpc

            if not cfg.grpc_target:
                raise ValueError("api=grpc needs grpc_target")
            channel = grpc.aio.insecure_channel(cfg.grpc_target)
            stub = ipb_grpc.InferenceStub(channel)
        reqs = workload.requests
        finished = {r.index: asyncio.Event() for r in reqs}
        results: dict[int, RequestResult] = {}
        sem = asyncio.Semaphore(cfg.concurrency)
        pacer = Pacer(cfg.request_rate, cfg.seed)
        t0 = time.perf_counter()
        ends: list[float] = []

        async def one(req: BenchRequest) -> None:
            res: RequestResult | None = None
            try:
                if req.after is not None:
                    await finished[req.after].wait()
                if req.arrival_s is not None:
                    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
                async with sem:
                    await pacer.wait()
                    res = RequestResult(req.index, req.conversation, req.turn, req.tag,
                                        sent_at=time.perf_counter() - t0)
                    results[req.index] = res
                    if channel is not None:
                        await send_grpc(stub, req, cfg, model, res)
                    else:
                        await send(http, req, cfg, model, res)
                    ends.append(time.perf_counter())
            except asyncio.CancelledError:
                if res is not None:
                    res.error, res.ok = DEADLINE_ERROR, False
                    ends.append(time.perf_counter())
                raise
            except Exception as exc:  # a bug or an odd server must not hang the run
                if res is not None:
                    res.error, res.ok = f"{type(exc).__name__}: {exc}", False
                    ends.append(time.perf_counter())
            finally:
                finished[req.index].set()
                if res is not None and on_result is not None:
                    on_result(res)

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        _, pending = await asyncio.wait(tasks, timeout=cfg.max_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if channel is not None:
            await channel.close()
        wall = (max(ends) - t0) if ends else 0.0
        ordered = [results[r.index] for r in reqs if r.index in results]
        return RunResult(ordered, wall, len(reqs) - len(ordered), model)


async def warm_up(cfg: ClientConfig, n: int, model: str | None = None) -> None:
    """Send `n` short requests with text unrelated to any workload (first-request costs:
    connections, compilation), so they do not count and do not seed the prefix cache."""
    if n <= 0:
        return
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with httpx.AsyncClient(base_url=cfg.root, trust_env=False, headers=headers,
                                 timeout=cfg.request_timeout_s) as http:
        model = model or cfg.model or await discover_model(http)
        for i in range(n):
            r = await http.post("/v1/completions", json={
                "model": model, "prompt": f"Warm-up request {i}: ready?", "max_tokens": 4,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
