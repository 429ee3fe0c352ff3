"""gRPC channel and server options that agree with each other on keepalive.

A gateway keeps one long-lived GenerateStream open to every worker (services/gateway/
generate_stream.py), idle whenever the worker has nothing to generate, and its channel pings
the worker every `KEEPALIVE_S` so that a dead peer is noticed. gRPC servers by default accept
a ping on a connection that carries no data at most every 5 minutes: after two pings that come
sooner, a worker answers with GOAWAY `too_many_pings` and closes the connection, and the next
request sent on it fails with UNAVAILABLE ("Too many pings"). With two workers idle for half a
minute, a request then failed on both and the client saw 503 "no live decode worker". Every
splitserve gRPC server therefore accepts pings at half the interval its clients send them.
"""

from __future__ import annotations

KEEPALIVE_S = 10.0
"""How often a gateway pings a worker connection (with a stream open, data or not)."""

KEEPALIVE_TIMEOUT_S = 20.0
"""A ping unanswered this long marks the connection dead (its calls fail and migrate)."""

Options = list[tuple[str, int]]


def channel_options(max_receive_bytes: int, keepalive_s: float = KEEPALIVE_S) -> Options:
    """Options of a client channel (gateway to worker)."""
    return [("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000))]


def server_options(max_receive_bytes: int, client_keepalive_s: float = KEEPALIVE_S) -> Options:
    """Options of a server (worker API, the gateway's public API) whose clients may ping every
    `client_keepalive_s`, with or without calls in flight."""
    return [("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", int(client_keepalive_s * 500)),
            ("grpc.keepalive_permit_without_calls", 1)]
