"""The gateway's request path through worker failures, against real gRPC worker servers whose
behaviour the test scripts (stream some tokens then die / stall / refuse a prefill), a real
Redis registry and the real PDFlow: migration keeps the client's stream whole, a failed prefill
becomes a local prefill, and an empty prefill pool is no reason to fail."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import pytest
from redis.asyncio import Redis

from router.policies import make_policy
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.gateway.metrics import GatewayMetrics
from services.gateway.pd_flow import GenerationResult, MigrationConfig, PDFlow
from services.gateway.worker_directory import WorkerDirectory
from services.grpc_auth import TokenAuthInterceptor
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from services.worker.grpc_service import RequestFailed, serve_generate_stream
from services.worker.stream_server import FramedStreamServer
from tests.support.cluster import TEST_SECRET

NS = "mig"
STREAMS = "tcp"  # set per test by the `transport` fixture


@pytest.fixture(autouse=True, params=["tcp", "grpc", "per-request"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs over every worker transport: the shared GenerateStream on the worker's
    framed TCP port and as a gRPC call, and a gRPC Generate call per request."""
    monkeypatch.setattr(sys.modules[__name__], "STREAMS", request.param)
    return request.param
PROMPT = [5, 6, 7, 8]


def continuation(prompt: list[int], n: int) -> list[int]:
    """The 'model': the next token is 100 + the position in the whole sequence (greedy and
    position-dependent, so a continuation that drops or repeats a token gives other ids)."""
    return [100 + len(prompt) + i for i in range(n)]


@dataclass
class Script:
    """What a fake worker does."""

    die_after: int | None = None  # stream this many chunks, then fail with UNAVAILABLE
    stall_after: int | None = None  # stream this many chunks, then hang
    refuse_prefill: bool = False
    texts: list[str] | None = None  # the text of the token at each generated position
    calls: list[pb.GenerateRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    prefills: int = 0

    def text(self, token: int) -> str:
        pos = token - 100 - len(PROMPT)
        return self.texts[pos] if self.texts and pos < len(self.texts) else f"<{token}>"


class FakeWorker(pb_grpc.WorkerServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Prefill(self, request, context):
        self.script.prefills += 1
        if self.script.refuse_prefill:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine dead")
        return pb.PrefillResponse(kv_transfer_params_json='{"remote": "fake"}')

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in self._chunks(request, context.abort):
            yield chunk

    async def GenerateStream(self, request_iterator, context) -> None:
        await serve_generate_stream(request_iterator, context, self.stream_chunks)

    def stream_chunks(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        """A request's chunks on a shared stream (gRPC or framed TCP): failing is raising."""
        async def fail(code: grpc.StatusCode, message: str) -> None:
            raise RequestFailed(code, message)

        return self._chunks(request, fail)

    async def _chunks(self, request, abort) -> AsyncIterator[pb.GenerateChunk]:
        self.script.calls.append(request)
        prompt = list(request.prompt_token_ids)
        tokens = continuation(prompt, request.sampling.max_tokens)
        stops = list(request.sampling.stop)
        if stops and not request.sampling.include_stop_str_in_output:
            # an engine holding back text would take it along when it dies
            await abort(grpc.StatusCode.FAILED_PRECONDITION, "engine holds back text")
        out = ""
        for i, t in enumerate(tokens):
            if self.script.die_after is not None and i == self.script.die_after:
                await abort(grpc.StatusCode.UNAVAILABLE, "engine died")
            if self.script.stall_after is not None and i == self.script.stall_after:
                await asyncio.sleep(3600)
            text, finish = self.script.text(t), "length" if i == len(tokens) - 1 else ""
            # vLLM's own stop-string check over this engine's output (kept in the output)
            for stop in stops:
                at = (out + text).find(stop, max(len(out) - len(stop) + 1, 0))
                if at != -1:
                    text, finish = (out + text)[len(out):at + len(stop)], "stop"
                    break
            out += text
            yield pb.GenerateChunk(token_ids=[t], text=text, num_prompt_tokens=len(prompt)
                                   if i == 0 else 0, finish_reason=finish)
            if finish:
                return
            await asyncio.sleep(0)

    async def Abort(self, request, context):
        self.script.aborts.append(request.request_id)
        return pb.AbortResponse(found=False)

    async def Release(self, request, context):
        return pb.ReleaseResponse()


@pytest.fixture
async def cluster(r: Redis):
    servers: list[grpc.aio.Server] = []
    stream_servers: list[FramedStreamServer] = []
    registry = WorkerRegistry(r, NS, ttl_s=30)

    async def add(worker_id: str, role: WorkerRole, script: Script) -> Script:
        worker = FakeWorker(script)
        server = grpc.aio.server(interceptors=[TokenAuthInterceptor(TEST_SECRET)])
        pb_grpc.add_WorkerServicer_to_server(worker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        framed = FramedStreamServer(worker.stream_chunks, "127.0.0.1", 0, TEST_SECRET)
        stream_port = await framed.start()
        stream_servers.append(framed)
        await registry.register(WorkerInfo(worker_id=worker_id, role=role,
                                           address=f"127.0.0.1:{port}",
                                           stream_address=f"127.0.0.1:{stream_port}", model="m"))
        return script

    yield add
    served = sum(f.streams_served for f in stream_servers)
    assert served > 0 if STREAMS == "tcp" else served == 0, (STREAMS, served)
    for f in stream_servers:
        await f.stop()
    for s in servers:
        await s.stop(0)


async def run_flow(r: Redis, max_tokens: int, **migration: float) -> tuple[list[int], PDFlow]:
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, streams=STREAMS)
    await directory.refresh()
    metrics = GatewayMetrics()
    flow = PDFlow(directory, make_policy("least_loaded"), None, metrics, timeout_s=30,
                  migration=MigrationConfig(**migration))
    got: list[int] = []
    try:
        async for chunk in flow.stream("req", list(PROMPT), pb.SamplingParams(
                max_tokens=max_tokens, temperature=0.0), GenerationResult()):
            got.extend(chunk.token_ids)
    finally:
        await directory.stop()
    return got, flow


async def run_text(r: Redis, max_tokens: int, stop: list[str]
                   ) -> tuple[str, GenerationResult, PDFlow]:
    """Like run_flow, for the text a client is sent."""
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET, streams=STREAMS)
    await directory.refresh()
    flow = PDFlow(directory, make_policy("least_loaded"), None, GatewayMetrics(), timeout_s=30)
    result, text = GenerationResult(), ""
    try:
        async for chunk in flow.stream("req", list(PROMPT), pb.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, stop=stop), result):
            text += chunk.text
        await asyncio.sleep(0.2)  # aborts are sent from a task of their own
    finally:
        await directory.stop()
    return text, result, flow


async def test_decode_failure_mid_stream_continues_on_another_worker(r: Redis, cluster) -> None:
    dying = await cluster("d-a", WorkerRole.DECODE, Script(die_after=3))
    healthy = await cluster("d-b", WorkerRole.DECODE, Script())
    await cluster("p-a", WorkerRole.PREFILL, Script())
    got, flow = await run_flow(r, max_tokens=10)
    assert got == continuation(PROMPT, 10)  # no token lost, none repeated
    assert len(dying.calls) == 1 and len(healthy.calls) == 1
    moved = healthy.calls[0]
    assert list(moved.prompt_token_ids) == PROMPT + continuation(PROMPT, 3)
    assert moved.sampling.max_tokens == 7 and moved.request_id == "req.m1"
    assert flow.metrics.migrations._value.get() == 1


async def test_a_stalled_decode_stream_counts_as_a_failure(r: Redis, cluster) -> None:
    stalling = await cluster("d-a", WorkerRole.DECODE, Script(stall_after=2))
    await cluster("d-b", WorkerRole.DECODE, Script())
    await cluster("p-a", WorkerRole.PREFILL, Script())
    got, flow = await asyncio.wait_for(run_flow(r, max_tokens=6, stall_timeout_s=0.5), 20)
    assert got == continuation(PROMPT, 6)
    assert len(stalling.calls) == 1 and flow.metrics.migrations._value.get() == 1


async def test_failed_prefill_becomes_a_local_prefill(r: Redis, cluster) -> None:
    prefill = await cluster("p-a", WorkerRole.PREFILL, Script(refuse_prefill=True))
    decode = await cluster("d-a", WorkerRole.DECODE, Script())
    got, flow = await run_flow(r, max_tokens=4)
    assert got == continuation(PROMPT, 4)
    assert prefill.prefills == 1 and decode.calls[0].kv_transfer_params_json == ""
    assert flow.metrics.prefill_fallbacks._value.get() == 1


async def test_an_empty_prefill_pool_is_served_by_decode(r: Redis, cluster) -> None:
    decode = await cluster("d-a", WorkerRole.DECODE, Script())
    got, _ = await run_flow(r, max_tokens=3)
    assert got == continuation(PROMPT, 3) and decode.calls[0].kv_transfer_params_json == ""


async def test_a_request_gives_up_after_max_migrations(r: Redis, cluster) -> None:
    from services.gateway.pd_flow import WorkerUnavailable

    for name in ("d-a", "d-b", "d-c"):
        await cluster(name, WorkerRole.DECODE, Script(die_after=1))
    with pytest.raises(WorkerUnavailable, match="failed on 3 decode workers"):
        await run_flow(r, max_tokens=8, max_migrations=2)


SENTENCE = ["Hello", " wor", "ld", "\n", "\n", "tail", " text"]


async def test_text_held_back_for_a_stop_string_survives_a_migration(r: Redis, cluster) -> None:
    """The dying worker had streamed "Hello", " wor", "ld": the gateway, not the engine, held
    back what could start the stop string, so nothing is lost; the next worker ends the
    request at the stop string it sees itself."""
    dying = await cluster("d-a", WorkerRole.DECODE, Script(die_after=3, texts=SENTENCE))
    healthy = await cluster("d-b", WorkerRole.DECODE, Script(texts=SENTENCE))
    text, result, flow = await run_text(r, max_tokens=7, stop=["\n\n"])
    assert text == "Hello world" and result.finish_reason == "stop"
    assert len(dying.calls) == 1 and len(healthy.calls) == 1
    assert flow.metrics.migrations._value.get() == 1
    assert result.completion_tokens == 5 and not healthy.aborts


async def test_a_stop_string_across_the_migration_ends_the_request(r: Redis, cluster) -> None:
    """The stop string begins on the dying worker ("\n") and ends on the next one ("\n"):
    neither engine sees it whole; the gateway does, ends the text and aborts the worker."""
    await cluster("d-a", WorkerRole.DECODE, Script(die_after=4, texts=SENTENCE))
    healthy = await cluster("d-b", WorkerRole.DECODE, Script(texts=SENTENCE))
    text, result, _ = await run_text(r, max_tokens=7, stop=["\n\n"])
    assert text == "Hello world" and result.finish_reason == "stop"
    assert result.completion_tokens == 5
    assert healthy.aborts == ["req.m1"]


async def test_stop_strings_without_migration(r: Redis, cluster) -> None:
    await cluster("d-a", WorkerRole.DECODE, Script(texts=SENTENCE))
    text, result, _ = await run_text(r, max_tokens=7, stop=["world", "tail"])
    assert (text, result.finish_reason) == ("Hello ", "stop")
    text, result, _ = await run_text(r, max_tokens=7, stop=["nowhere"])
    assert (text, result.finish_reason) == ("".join(SENTENCE), "length")


async def test_the_kv_policy_asks_the_index_only_when_there_is_a_choice(r: Redis,
                                                                        cluster) -> None:
    """One aggregated worker: every request goes there, no Redis lookup on its way; a second
    worker makes it a choice, and every request asks the prefix index (one round trip)."""
    from router.prefix_index import PrefixIndex

    await cluster("b-a", WorkerRole.BOTH, Script())

    async def lookups(n: int) -> float:
        """Prefix-index lookups the gateway made for n requests."""
        directory = WorkerDirectory(r, NS, "m", TEST_SECRET, streams=STREAMS)
        await directory.refresh()
        flow = PDFlow(directory, make_policy("kv"), PrefixIndex(r, NS), GatewayMetrics(),
                      timeout_s=30)
        try:
            for i in range(n):
                async for _ in flow.stream(f"req{i}", list(PROMPT) * 20, pb.SamplingParams(
                        max_tokens=2, temperature=0.0), GenerationResult()):
                    pass
        finally:
            await directory.stop()
        samples = {s.name: s.value for m in flow.metrics.index_lookup.collect()
                   for s in m.samples}
        return samples["splitserve_gateway_index_lookup_seconds_count"]

    assert await lookups(3) == 0.0
    await cluster("b-b", WorkerRole.BOTH, Script())
    assert await lookups(3) == 3.0
