"""The worker's GenerateStream over framed TCP (the wire: services/framed_stream.py).

Each accepted connection is served exactly like a gRPC GenerateStream call, by the same
`serve_generate_stream` (services/worker/grpc_service.py): the frames read are its request
iterator, its batches are written as frames. A connection that does not start with the
protocol's preamble and the cluster's stream token (services/framed_stream.py), sends a frame
that is not one, or goes away ends its stream; the engine aborts the requests that were on it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import AsyncIterator

from services.cluster_secret import ClusterSecret
from services.framed_stream import (PREAMBLE, TOKEN_BYTES, FrameError, frame, read_frame,
                                    tune_socket)
from services.proto.v1 import worker_pb2 as pb
from services.worker.grpc_service import ChunkSource, serve_generate_stream

log = logging.getLogger(__name__)

PREAMBLE_TIMEOUT_S = 10.0


class _FrameWriter:
    """The `context` serve_generate_stream writes batches to."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, batch: pb.GenerateStreamBatch) -> None:
        self._writer.write(frame(batch))
        await self._writer.drain()


class FramedStreamServer:
    """Serves GenerateStream on host:port for one worker's engine."""

    def __init__(self, chunks: ChunkSource, host: str, port: int, secret: ClusterSecret
                 ) -> None:
        self._chunks = chunks
        self._token = secret.stream_token
        self.refused = 0  # connections without the cluster's token
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.streams_served = 0

    async def start(self) -> int:
        """Listen; returns the bound port."""
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every stream (their requests are aborted)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            tune_socket(writer)
            try:
                hello = await asyncio.wait_for(
                    reader.readexactly(len(PREAMBLE) + TOKEN_BYTES), PREAMBLE_TIMEOUT_S)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                self.refused += 1
                return
            if hello[:len(PREAMBLE)] != PREAMBLE:
                self.refused += 1
                log.warning("GenerateStream connection from %s: not this protocol; closed", peer)
                return
            if not hmac.compare_digest(hello[len(PREAMBLE):], self._token):
                self.refused += 1
                log.warning("GenerateStream connection from %s: not the cluster's token; "
                            "closed", peer)
                return
            self.streams_served += 1
            await serve_generate_stream(self._requests(reader, task), _FrameWriter(writer),
                                        self._chunks)
        except ConnectionError as exc:  # writing to a gateway that went away (reads: below)
            log.info("GenerateStream from %s ended: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    @staticmethod
    async def _requests(reader: asyncio.StreamReader, serving: asyncio.Task
                        ) -> AsyncIterator[pb.GenerateStreamRequest]:
        """The requests a connection sends. The gateway never half-closes: when its side ends
        (closed, broken, or not speaking the protocol), the whole stream ends, and with it
        every request still running on it."""
        try:
            while (msg := await read_frame(reader, pb.GenerateStreamRequest.FromString)
                   ) is not None:
                yield msg
        except (FrameError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("GenerateStream connection broken: %s", exc or type(exc).__name__)
        finally:
            serving.cancel()
