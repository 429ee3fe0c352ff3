"""GenerateStream, gateway and worker ends over real gRPC: many requests on one stream, their
chunks batched, each request failing, cancelled or timing out alone, and a broken stream
failing every request on it with a status the gateway migrates on."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import pytest

from services.cluster_secret import ClusterSecret
from services.gateway.generate_stream import SharedGenerateStream
from services.gateway.pd_flow import _RETRYABLE
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from services.worker.grpc_service import RequestFailed, serve_generate_stream
from services.worker.stream_server import FramedStreamServer
from tests.support.cluster import TEST_SECRET

TOKEN = TEST_SECRET.stream_token

BAD, FAIL, STALL = 1, 2, 3  # prompt[0]: what the fake engine does with a request


class Engine(pb_grpc.WorkerServicer):
    """Generates token 1000 * request number + position, one token per 'step'; a step is
    one loop iteration for every running request at once, as in an engine."""

    def __init__(self) -> None:
        self.grpc_streams = 0
        self.framed: FramedStreamServer | None = None
        self.cancelled: list[str] = []
        self.started: list[str] = []

    async def GenerateStream(self, request_iterator, context) -> None:
        self.grpc_streams += 1
        await serve_generate_stream(request_iterator, context, self.chunks)

    @property
    def streams(self) -> int:
        """Streams served: gRPC calls, or connections of its framed TCP server."""
        return self.framed.streams_served if self.framed is not None else self.grpc_streams

    async def chunks(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        self.started.append(request.request_id)
        kind, n = request.prompt_token_ids[0], request.prompt_token_ids[1]
        if kind == BAD:
            raise ValueError("prompt too long")
        try:
            for i in range(request.sampling.max_tokens):
                if kind == FAIL and i == 2:
                    raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "engine died")
                if kind == STALL and i == 2:
                    await asyncio.sleep(3600)
                await asyncio.sleep(0.005)
                last = i == request.sampling.max_tokens - 1
                yield pb.GenerateChunk(token_ids=[1000 * n + i], text=f"<{i}>",
                                       finish_reason="length" if last else "")
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise


class TcpWorker:
    """The same engine behind a framed TCP GenerateStream server (services/framed_stream.py)."""

    def __init__(self, engine: Engine) -> None:
        self.framed = FramedStreamServer(engine.chunks, "127.0.0.1", 0, TEST_SECRET)
        engine.framed = self.framed

    async def stop(self, grace: float | None) -> None:
        await self.framed.stop()


@pytest.fixture(params=["grpc", "tcp"])
async def worker(request: pytest.FixtureRequest):
    """(engine, the gateway's stream to it, its server); every test runs over both carriers
    of GenerateStream. `engine.streams` counts the streams the worker served."""
    engine = Engine()
    server = grpc.aio.server()
    pb_grpc.add_WorkerServicer_to_server(engine, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    tcp = None
    if request.param == "tcp":
        tcp = TcpWorker(engine)
        tcp_port = await tcp.framed.start()
        stream = SharedGenerateStream.over_tcp(f"127.0.0.1:{tcp_port}", TOKEN)
    else:
        stream = SharedGenerateStream.over_grpc(pb_grpc.WorkerStub(channel),
                                                f"127.0.0.1:{port}")
    yield engine, stream, tcp or server
    await stream.close()
    await channel.close()
    if tcp is not None:
        await tcp.stop(0)
    await server.stop(0)


def request(rid: str, kind: int, n: int, max_tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=[kind, n],
                              sampling=pb.SamplingParams(max_tokens=max_tokens))


async def collect(call) -> list[int]:
    out: list[int] = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        out.extend(chunk.token_ids)
    return out


async def test_many_requests_share_one_stream_and_its_messages(worker) -> None:
    engine, stream, _ = worker
    calls = [stream.generate(request(f"r{n}", 0, n), timeout=30) for n in range(20)]
    got = await asyncio.gather(*(collect(c) for c in calls))
    assert got == [[1000 * n + i for i in range(8)] for n in range(20)]
    assert engine.streams == 1
    # 20 requests x (8 chunks + 1 end) = 180 items; steps of concurrent requests share messages
    # (how many depends on how the 20 starts trickle in on a busy host: at least 2 per message)
    assert stream.items_received == 180
    assert stream.batches_received <= 180 // 2, stream.batches_received


async def test_a_failing_request_fails_alone_with_its_status(worker) -> None:
    engine, stream, _ = worker
    bad = stream.generate(request("bad", BAD, 1), timeout=30)
    failing = stream.generate(request("fail", FAIL, 2), timeout=30)
    good = stream.generate(request("good", 0, 3), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as bad_err:
        await collect(bad)
    assert bad_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_err.value.details() == "prompt too long"
    with pytest.raises(grpc.aio.AioRpcError) as fail_err:
        await collect(failing)
    assert fail_err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await collect(good) == [3000 + i for i in range(8)]
    assert engine.streams == 1


async def test_cancel_and_deadline_stop_the_request_on_the_worker(worker) -> None:
    engine, stream, _ = worker
    stalled = stream.generate(request("stalled", STALL, 1), timeout=30)
    assert (await stalled.read()).token_ids == [1000]
    assert (await stalled.read()).token_ids == [1001]
    assert stalled.cancel() is True
    timed = stream.generate(request("timed", STALL, 2), timeout=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(timed)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if set(engine.cancelled) == {"stalled", "timed"}:
            break
        await asyncio.sleep(0.02)
    assert set(engine.cancelled) == {"stalled", "timed"}
    assert await collect(stream.generate(request("after", 0, 4), timeout=30)) == [
        4000 + i for i in range(8)]
    assert await stalled.read() is grpc.aio.EOF  # a cancelled call reads as over


async def test_a_broken_stream_fails_its_requests_as_retryable_and_a_new_one_opens(worker
                                                                                  ) -> None:
    engine, stream, server = worker
    stalled = [stream.generate(request(f"s{n}", STALL, n), timeout=30) for n in range(3)]
    for c in stalled:
        await c.read()
    await server.stop(0)  # the worker goes away
    for c in stalled:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(c)
        assert err.value.code() in _RETRYABLE, err.value.code()


@pytest.mark.parametrize("server_accepts_pings", [False, True])
async def test_an_idle_stream_survives_the_gateways_keepalive(server_accepts_pings: bool) -> None:
    """The gateway pings a worker connection that carries an idle GenerateStream. A server
    with gRPC's default ping policy ends such a connection (GOAWAY too_many_pings: a request
    sent at that moment failed on every idle worker, 503); splitserve's servers accept the
    pings (services/grpc_options.py). Production options on both sides, at a keepalive of
    0.3 s instead of 10 s (and gRPC's own ping throttling lifted to match)."""
    from services.grpc_options import channel_options, server_options

    keepalive = 0.3
    server = grpc.aio.server(options=server_options(1 << 20, keepalive) if server_accepts_pings
                             else [("grpc.so_reuseport", 0)])
    pb_grpc.add_WorkerServicer_to_server(Engine(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(
        1 << 20, keepalive) + [("grpc.http2.min_time_between_pings_ms", int(keepalive * 1000)),
                               ("grpc.http2.max_pings_without_data", 0)])
    stream = SharedGenerateStream.over_grpc(pb_grpc.WorkerStub(channel), f"127.0.0.1:{port}")
    try:
        for n in range(1, 4):  # requests separated by idle time on one open stream
            try:
                await collect(stream.generate(request(f"r{n}", 0, n, 2), timeout=10))
            except grpc.aio.AioRpcError as exc:  # a GOAWAY that raced the request
                assert not server_accepts_pings, exc
            await asyncio.sleep(keepalive * 12)
        if server_accepts_pings:
            assert stream.streams_opened == 1
        else:  # the connection was torn down while idle, every time
            assert stream.streams_opened >= 3
    finally:
        await stream.close()
        await channel.close()
        await server.stop(0)


async def test_the_framed_port_closes_strangers_and_aborts_what_a_vanished_gateway_left() -> None:
    """The worker's framed GenerateStream port: a connection not speaking the protocol,
    without the cluster's stream token, or sending an oversized frame, is closed without
    touching other streams; a gateway whose connection goes away leaves nothing running in
    the engine."""
    from services.framed_stream import MAX_FRAME_BYTES, PREAMBLE, frame

    engine = Engine()
    tcp = TcpWorker(engine)
    port = await tcp.framed.start()
    try:
        # an HTTP probe, then a client announcing a frame over the limit
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                     + b" " * (len(PREAMBLE) + len(TOKEN)))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREAMBLE + TOKEN + (MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # a client that speaks the protocol but has another cluster's token (or none): its
        # request never reaches the engine
        assert tcp.framed.refused == 1
        for hello in (PREAMBLE + ClusterSecret.generate().stream_token, PREAMBLE):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello + frame(pb.GenerateStreamRequest(start=request("x", 0, 1))))
            assert await asyncio.wait_for(reader.read(), 15) == b""
        assert tcp.framed.refused == 3 and engine.started == []
        wrong = SharedGenerateStream.over_tcp(f"127.0.0.1:{port}",
                                              ClusterSecret.generate().stream_token)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(wrong.generate(request("y", 0, 1), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await wrong.close()
        # a gateway starts a request that runs until cancelled, then its connection drops
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREAMBLE + TOKEN + frame(pb.GenerateStreamRequest(
            start=request("gone", STALL, 1))))
        first = pb.GenerateStreamBatch.FromString(
            await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big")))
        assert first.items[0].request_id == "gone"
        writer.close()
        for _ in range(100):
            if "gone" in engine.cancelled:
                break
            await asyncio.sleep(0.02)
        assert engine.cancelled == ["gone"]
        # and the port still serves a well-behaved gateway
        stream = SharedGenerateStream.over_tcp(f"127.0.0.1:{port}", TOKEN)
        assert await collect(stream.generate(request("ok", 0, 5), timeout=10)) == [
            5000 + i for i in range(8)]
        await stream.close()
    finally:
        await tcp.stop(0)


async def test_a_worker_that_is_not_there_fails_the_request_as_retryable() -> None:
    from services.ports import free_port

    stream = SharedGenerateStream.over_tcp(f"127.0.0.1:{free_port('127.0.0.1')}", TOKEN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stream.generate(request("x", 0, 1), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.code() in _RETRYABLE
    await stream.close()
