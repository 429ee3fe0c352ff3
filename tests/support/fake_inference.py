"""A small in-process splitserve.v1.Inference server for SDK tests (no cluster): it echoes the
last message's words as chunks, and fails or stalls on request."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

from splitserve_sdk.proto.v1 import inference_pb2 as pb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as pb_grpc

# prompt text -> status the server answers with
ERRORS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "notfound": grpc.StatusCode.NOT_FOUND,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
}


class FakeInference(pb_grpc.InferenceServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.cancelled = 0

    async def _echo(self, text: str, context: Any):
        self.calls += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if text in ERRORS:
            await context.abort(ERRORS[text], f"fake {text}")
        try:
            if text == "slow":
                await asyncio.sleep(30)
            words = text.split()
            for i, w in enumerate(words):
                yield pb.CompletionChunk(id="fake-1", token_ids=[i], text=w + " ")
                if w == "FAIL":  # something streamed, then the gateway loses its worker
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")
                if w == "PAUSE":
                    await asyncio.sleep(30)
            n = len(words)
            yield pb.CompletionChunk(id="fake-1", finish_reason="stop", usage=pb.Usage(
                prompt_tokens=3, completion_tokens=n, total_tokens=3 + n))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def Chat(self, request, context):
        async for c in self._echo(request.messages[-1].content, context):
            yield c

    async def Complete(self, request, context):
        text = (request.text if request.WhichOneof("prompt") == "text"
                else " ".join(str(i) for i in request.token_ids.ids))
        async for c in self._echo(text, context):
            yield c

    async def ListModels(self, request, context):
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        return pb.ListModelsResponse(models=[pb.Model(id="fake", max_model_len=128,
                                                      owned_by="tests")])

    async def Health(self, request, context):
        return pb.HealthResponse(status=pb.HealthResponse.SERVING,
                                 workers={"prefill": 1, "decode": 1})


class FakeServer:
    """Serves FakeInference on 127.0.0.1:port from a thread of its own, optionally only after
    `delay` seconds (a gateway that is not up yet)."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.port = port
        self.delay = delay
        self.servicer = FakeInference()
        self.started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        await asyncio.sleep(self.delay)
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(self.servicer, server)
        server.add_insecure_port(self.target)
        await server.start()
        self.started.set()
        await self._stop.wait()
        await server.stop(grace=0)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        if self.delay == 0:
            assert self.started.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._stop is None:
            pass
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
