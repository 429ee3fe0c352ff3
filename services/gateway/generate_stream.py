"""The gateway's end of a worker's GenerateStream: many requests over one long-lived stream.

A Generate call per request costs a gRPC message per token and request in both processes (on
2 cores about half of the worker actor's and a third of the gateway's CPU went to those
messages' system calls). GenerateStream carries every request of an engine step in one message.
`SharedGenerateStream.generate` returns a `StreamedCall` that behaves like the call object of
`WorkerStub.Generate` for what PDFlow uses (`read()` returning chunks then `grpc.aio.EOF`,
`cancel()`, and `grpc.aio.AioRpcError` with the worker's status code when the request fails or
the stream breaks), so the request path, its migration on failure and its error mapping are
the same with either transport.

The stream itself runs over the worker's framed TCP port by default (`FramedStreamCall`,
services/framed_stream.py: the same messages, without gRPC's threads between the socket and the
event loop) or as a gRPC GenerateStream call; SharedGenerateStream reads and writes both alike.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Literal

import grpc

from services import request_id as request_ids
from services.framed_stream import (PREAMBLE, FrameError, frame, read_frame, split_address,
                                    tune_socket)
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

WorkerStreams = Literal["tcp", "grpc", "per-request"]
"""How a gateway sends requests to workers and reads their tokens: a shared stream per worker
on its framed TCP port or as a gRPC call, or a gRPC Generate call per request."""

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


class FramedStreamCall:
    """A GenerateStream on a worker's framed TCP port, with the gRPC call's interface for what
    SharedGenerateStream uses: `write(msg)`, `read()` (a batch, then `grpc.aio.EOF`),
    `cancel()`; a connection that cannot be made or breaks raises UNAVAILABLE."""

    CONNECT_TIMEOUT_S = 10.0

    def __init__(self, host: str, port: int, token: bytes) -> None:
        """`token`: the cluster's stream token (ClusterSecret.stream_token), sent after the
        preamble."""
        self.address = f"{host}:{port}"
        self._token = token
        self._connection = asyncio.ensure_future(self._connect(host, port))
        self._streams_ready: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _connect(self, host: str, port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                self.CONNECT_TIMEOUT_S)
        tune_socket(writer)
        writer.write(PREAMBLE + self._token)
        return reader, writer

    async def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The connection's reader and writer (awaited once; every batch read uses them)."""
        if self._streams_ready is not None:
            return self._streams_ready
        try:
            self._streams_ready = await asyncio.shield(self._connection)
            return self._streams_ready
        except (OSError, TimeoutError) as exc:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"cannot open the worker stream at "
                            f"{self.address}: {exc or type(exc).__name__}") from None

    async def write(self, message: pb.GenerateStreamRequest) -> None:
        _, writer = await self._streams()
        try:
            writer.write(frame(message))
            await writer.drain()
        except ConnectionError as exc:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE,
                            f"worker stream to {self.address} broken: {exc}") from None

    async def read(self) -> Any:
        reader, _ = await self._streams()
        try:
            batch = await read_frame(reader, pb.GenerateStreamBatch.FromString)
        except (asyncio.IncompleteReadError, ConnectionError, FrameError) as exc:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"worker stream to {self.address} "
                            f"broken: {exc or type(exc).__name__}") from None
        return grpc.aio.EOF if batch is None else batch

    def cancel(self) -> bool:
        if not self._connection.done():
            self._connection.cancel()
        elif not self._connection.cancelled() and self._connection.exception() is None:
            self._connection.result()[1].close()
        return True


class SharedGenerateStream:
    """The gateway's GenerateStream to one worker, opened on first use and again after it
    ends; requests on a stream that breaks fail with the stream's status (UNAVAILABLE when it
    just ends), which PDFlow treats as the worker failing: the request migrates."""

    def __init__(self, open_stream: Callable[[], Any], address: str) -> None:
        """`open_stream()` starts a stream: a gRPC `WorkerStub.GenerateStream` call
        (`over_grpc`) or a FramedStreamCall (`over_tcp`); both are written and read alike."""
        self._open_stream = open_stream
        self.address = address
        self._call: Any = None
        self._calls: dict[str, StreamedCall] = {}
        self._outbox: asyncio.Queue[pb.GenerateStreamRequest] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.streams_opened = 0  # streams started (again after one ended)
        self.batches_received = 0  # messages read from the worker, over all streams
        self.items_received = 0  # chunks and ends in them

    @classmethod
    def over_grpc(cls, stub: pb_grpc.WorkerStub, address: str) -> "SharedGenerateStream":
        """The stream as a gRPC GenerateStream call on the worker's API channel."""
        return cls(stub.GenerateStream, address)

    @classmethod
    def over_tcp(cls, stream_address: str, token: bytes) -> "SharedGenerateStream":
        """The stream on the worker's framed GenerateStream port (services/framed_stream.py),
        opened with the cluster's stream token."""
        host, port = split_address(stream_address)
        return cls(lambda: FramedStreamCall(host, port, token), stream_address)

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
        call = self._open_stream()
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
