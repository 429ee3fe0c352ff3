"""Worker gRPC takes only callers with the cluster's token: a real grpc.aio server and client,
every call of the worker API."""

from __future__ import annotations

from typing import AsyncIterator

import grpc
import pytest

from services.cluster_secret import ClusterSecret
from services.grpc_auth import HEADER, TokenAuthInterceptor, call_metadata, client_interceptors
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc

SECRET = ClusterSecret.from_text("grpc-auth-test-secret-0123456789")


class Worker(pb_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Health(self, request, context) -> pb.HealthResponse:
        self.calls.append("Health")
        return pb.HealthResponse(healthy=True, worker_id="w")

    async def Stats(self, request, context) -> pb.StatsResponse:
        self.calls.append("Stats")
        return pb.StatsResponse(worker_id="w")


@pytest.fixture
async def worker() -> AsyncIterator[tuple[Worker, str, TokenAuthInterceptor]]:
    w, auth = Worker(), TokenAuthInterceptor(SECRET)
    server = grpc.aio.server(interceptors=[auth])
    pb_grpc.add_WorkerServicer_to_server(w, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield w, f"127.0.0.1:{port}", auth
    await server.stop(0)


async def _calls(stub: pb_grpc.WorkerStub, **kw) -> list[grpc.StatusCode]:
    """Status of one call of each type."""
    codes = []

    async def one(coro) -> None:
        try:
            await coro
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())

    await one(stub.Health(pb.HealthRequest(), timeout=5, **kw))
    await one(stub.Stats(pb.StatsRequest(), timeout=5, **kw))
    return codes


async def test_callers_without_the_token_are_refused_before_the_handler(worker) -> None:
    w, address, auth = worker
    unauth = [grpc.StatusCode.UNAUTHENTICATED] * 2
    async with grpc.aio.insecure_channel(address) as ch:
        assert await _calls(pb_grpc.WorkerStub(ch)) == unauth
        wrong = ((HEADER, "Bearer " + "0" * 64),)
        assert await _calls(pb_grpc.WorkerStub(ch), metadata=wrong) == unauth
        other = call_metadata(ClusterSecret.from_text("another-cluster-0123456789"))
        assert await _calls(pb_grpc.WorkerStub(ch), metadata=other) == unauth
        # the raw secret is not the token either
        raw = ((HEADER, "Bearer " + SECRET.text),)
        assert await _calls(pb_grpc.WorkerStub(ch), metadata=raw) == unauth
    assert w.calls == [] and auth.refused == 8
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            await pb_grpc.WorkerStub(ch).Health(pb.HealthRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        assert "cluster secret" in (exc.details() or "")


async def test_callers_with_the_token_are_served(worker) -> None:
    w, address, auth = worker
    ok = [grpc.StatusCode.OK] * 2
    async with grpc.aio.insecure_channel(address, interceptors=client_interceptors(SECRET)
                                         ) as ch:
        assert await _calls(pb_grpc.WorkerStub(ch)) == ok
    async with grpc.aio.insecure_channel(address) as ch:
        assert await _calls(pb_grpc.WorkerStub(ch), metadata=call_metadata(SECRET)) == ok
    assert w.calls == ["Health", "Stats"] * 2 and auth.refused == 0
