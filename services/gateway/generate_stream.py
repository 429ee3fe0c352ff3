"""The gateway's end of a worker's GenerateStream: many requests over one long-lived stream.

A Generate call per request costs a gRPC message per token and request in both processes (on
2 cores about half of the worker actor's and a third of the gateway's CPU went to those
messages' system calls). GenerateStream carries every request of an engine step in one message.
`SharedGenerateStream.generate` returns a `StreamedCall` that behaves like the call object of
`WorkerStub.Generate` for what PDFlow uses (`read()` returning chunks then `grpc.aio.EOF`,
`cancel()`, and `grpc.aio.AioRpcError` with the worker's status code when the request fails or
the stream breaks), so the request path, its migration on failure and its error mapping are
the same with either transport.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from services import request_id as request_ids
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An AioRpcError like the one a failed Generate call raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class StreamedCall:
    """One request on a shared stream, read like a Generate call."""

    def __init__(self, stream: "SharedGenerateStream", request: pb.GenerateRequest,
                 timeout: float | None) -> None:
        self._stream = stream
        self._request = request
        self._timeout = timeout
        self._items: asyncio.Queue[pb.GenerateStreamItem | grpc.aio.AioRpcError] = (
            asyncio.Queue())
        self._started = False
        self._done = False
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def deliver(self, item: pb.GenerateStreamItem | grpc.aio.AioRpcError) -> None:
        """Called by the stream's reader with this request's next item (or the stream's end)."""
        self._items.put_nowait(item)

    async def read(self) -> Any:
        """The next chunk, `grpc.aio.EOF` after the last one; raises the request's error."""
        if self._done:
            return grpc.aio.EOF
        if not self._started:
            self._started = True
            if self._timeout is not None:
                self._deadline = asyncio.get_running_loop().call_later(
                    self._timeout, self.deliver,
                    rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            await self._stream.start(self)
        item = await self._items.get()
        if isinstance(item, grpc.aio.AioRpcError):
            self._finish(cancel=item.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
            raise item
        if not item.end:
            return item.chunk
        self._finish(cancel=False)
        if item.status_code != 0:
            raise rpc_error(_CODES.get(item.status_code, grpc.StatusCode.UNKNOWN),
                            item.status_message)
        return grpc.aio.EOF

    def cancel(self) -> bool:
        """Stop the request: the worker aborts it in its engine. False if already over."""
        if self._done:
            return False
        self._finish(cancel=self._started)
        return True

    def _finish(self, cancel: bool) -> None:
        self._done = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._stream.forget(self, cancel=cancel)


class SharedGenerateStream:
    """The gateway's GenerateStream to one worker, opened on first use and again after it
    ends; requests on a stream that breaks fail with the stream's status (UNAVAILABLE when it
    just ends), which PDFlow treats as the worker failing: the request migrates."""

    def __init__(self, stub: pb_grpc.WorkerStub, address: str) -> None:
        self._stub = stub
        self.address = address
        self._call: Any = None
        self._calls: dict[str, StreamedCall] = {}
        self._outbox: asyncio.Queue[pb.GenerateStreamRequest] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.streams_opened = 0  # streams started (again after one ended)
        self.batches_received = 0  # messages read from the worker, over all streams
        self.items_received = 0  # chunks and ends in them

    def generate(self, request: pb.GenerateRequest, timeout: float | None) -> StreamedCall:
        """A call-like handle for one request (sent on its first `read()`)."""
        return StreamedCall(self, request, timeout)

    async def start(self, call: StreamedCall) -> None:
        if call.request_id in self._calls:
            raise rpc_error(grpc.StatusCode.ALREADY_EXISTS,
                            f"request {call.request_id} is already on this stream")
        self._ensure_open()
        self._calls[call.request_id] = call
        self._outbox.put_nowait(pb.GenerateStreamRequest(
            start=call._request, caller_request_id=request_ids.current() or ""))

    def forget(self, call: StreamedCall, cancel: bool) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]
            if cancel and self._call is not None:
                self._outbox.put_nowait(
                    pb.GenerateStreamRequest(cancel_request_id=call.request_id))

    async def close(self) -> None:
        """End the stream (its requests fail as UNAVAILABLE)."""
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._fail_all(rpc_error(grpc.StatusCode.UNAVAILABLE, "worker stream closed"))

    def _ensure_open(self) -> None:
        if self._call is not None:
            return
        call = self._stub.GenerateStream()
        self._call = call
        self.streams_opened += 1
        self._outbox = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._write(call)),
                       asyncio.create_task(self._read(call))]

    async def _write(self, call: Any) -> None:
        try:
            while True:
                msg = await self._outbox.get()
                await call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the reader sees the stream's end and fails its requests

    async def _read(self, call: Any) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"worker stream to {self.address} ended")
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    break
                self.batches_received += 1
                self.items_received += len(batch.items)
                for item in batch.items:
                    if (target := self._calls.get(item.request_id)) is not None:
                        target.deliver(item)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            pass
        finally:
            if self._call is call:
                self._call = None
                for task in self._tasks:
                    if task is not asyncio.current_task():
                        task.cancel()
                call.cancel()
                self._fail_all(error)

    def _fail_all(self, error: grpc.aio.AioRpcError) -> None:
        calls, self._calls = self._calls, {}
        for c in calls.values():
            c.deliver(error)
