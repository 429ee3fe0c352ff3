"""GenerateStream over a plain TCP connection: the wire both ends of it share.

The gateway's shared stream to a worker (services/gateway/generate_stream.py) carries one
message per engine step. Over gRPC every message crosses gRPC's own threads in both processes
(its event engine and the asyncio completion-queue poller), and on a small or busy host each
of those thread wake-ups costs more than the message (measured here: ~0.6 ms of CPU per
message exchanged, against ~0.1 ms for the same bytes over an asyncio socket; on a cluster,
gateway CPU per token -15% and worker actor -12%; docs/benchmarks.md). A worker therefore also
serves GenerateStream on a TCP port of its own, with the same protobuf messages, framed:

    gateway -> worker   PREAMBLE, the stream token (TOKEN_BYTES, derived from the cluster
                        secret: ClusterSecret.stream_token), then frames of
                        splitserve.worker.v1.GenerateStreamRequest
    worker -> gateway   frames of splitserve.worker.v1.GenerateStreamBatch
    frame               4-byte big-endian payload length, then the serialized message

One connection is one stream: it ends when either side closes it, and requests still on it fail
as the gRPC stream's would (UNAVAILABLE: the gateway moves them to another worker). Everything
else of the worker API (Prefill, Abort, Release, Health, Stats, and Generate for tracing) stays
on gRPC.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable, TypeVar

from google.protobuf.message import Message

PREAMBLE = b"splitserve.worker.v1.GenerateStream/1\n"
"""What a client sends first; a worker closes a connection that starts otherwise."""

TOKEN_BYTES = 32
"""Length of the stream token that follows the preamble; a worker closes a connection whose
token is not its cluster's (compared in constant time)."""

MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Largest message either side accepts (as the worker's gRPC server)."""

KEEPALIVE_IDLE_S = 10
"""TCP keepalive: probe an idle connection after this long, as the gRPC channels ping."""
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 4

M = TypeVar("M", bound=Message)


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def frame(message: Message) -> bytes:
    """One message as it goes on the wire."""
    data = message.SerializeToString()
    return len(data).to_bytes(4, "big") + data


async def read_frame(reader: asyncio.StreamReader, parse: Callable[[bytes], M]) -> M | None:
    """The next message, None at a clean end of the stream (between frames). A stream that ends
    inside a frame raises asyncio.IncompleteReadError; an oversized frame raises FrameError."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return parse(await reader.readexactly(size))


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay (one frame per engine step must leave at once) and TCP keepalive, so a
    peer whose host vanished is noticed like a gRPC channel notices it."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def split_address(address: str) -> tuple[str, int]:
    """host:port (IPv6 as [addr]:port) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)
