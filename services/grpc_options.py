"""gRPC server options: keepalive pings that long-lived client connections may send.

gRPC servers by default accept a ping on a connection that carries no data at most every 5
minutes: after two pings that come sooner, a server answers with GOAWAY `too_many_pings` and
closes the connection, and the next call sent on it fails with UNAVAILABLE ("Too many pings").
Every splitserve gRPC server (the gateway's public API, a worker's Health/Stats API) therefore
accepts pings at half the interval a client that keeps a connection open sends them.
"""

from __future__ import annotations

KEEPALIVE_S = 10.0
"""How often a client pings a connection it keeps open (with calls in flight or not)."""

Options = list[tuple[str, int]]


def server_options(max_receive_bytes: int, client_keepalive_s: float = KEEPALIVE_S) -> Options:
    """Options of a server (worker API, the gateway's public API) whose clients may ping every
    `client_keepalive_s`, with or without calls in flight."""
    return [("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", int(client_keepalive_s * 500)),
            ("grpc.keepalive_permit_without_calls", 1)]
