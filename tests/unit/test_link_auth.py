"""The engine link's CURVE authentication on real ZeroMQ sockets: only a peer holding the
cluster secret gets a message through (CURVE also encrypts what it sends)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from services import link
from services.cluster_secret import ClusterSecret
from services.link import LinkAuthenticator, LinkKeys, LinkSecurityError, require_curve

SECRET = ClusterSecret.from_text("link-auth-test-secret-0123456789")


def test_keys_are_derived_from_the_secret() -> None:
    a, b = LinkKeys.derive(SECRET), LinkKeys.derive(SECRET)
    assert a == b  # every gateway and worker of a cluster derives the same keys
    other = LinkKeys.derive(ClusterSecret.from_text("another-cluster-0123456789"))
    assert len({a.server_public, a.client_public, other.server_public, other.client_public}) == 4
    assert zmq.curve_public(a.server_secret) == a.server_public
    assert SECRET.text.encode() not in repr(a).encode()


def test_no_curve_is_a_clear_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link.zmq, "has", lambda capability: False)
    with pytest.raises(LinkSecurityError, match="no CURVE support"):
        require_curve()
    with pytest.raises(LinkSecurityError):
        LinkKeys.derive(SECRET)


async def test_only_the_clusters_client_key_gets_through() -> None:
    keys = LinkKeys.derive(SECRET)
    server_ctx, client_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
    auth = LinkAuthenticator(server_ctx, keys)
    auth.start()
    server = server_ctx.socket(zmq.ROUTER)
    keys.secure_server(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    clients = []

    def dealer(client_keys: LinkKeys | None, server_key: bytes | None = None) -> zmq.Socket:
        sock = client_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if client_keys is not None:
            client_keys.secure_client(sock)
            if server_key is not None:
                sock.curve_serverkey = server_key
        sock.connect(f"tcp://127.0.0.1:{port}")
        clients.append(sock)
        return sock

    async def received(timeout: float) -> list[bytes] | None:
        try:
            frames = await asyncio.wait_for(server.recv_multipart(), timeout)
            return frames[1:]
        except TimeoutError:
            return None

    try:
        other = LinkKeys.derive(ClusterSecret.from_text("another-cluster-0123456789"))
        # a plain client, one with another cluster's keys, one with another client key
        # that knows this cluster's server key: none gets a frame to the worker
        await dealer(None).send_multipart([b"A", b"plain"])
        await dealer(other).send_multipart([b"A", b"other cluster"])
        await dealer(other, keys.server_public).send_multipart([b"A", b"stolen server key"])
        assert await received(1.5) is None
        assert auth.refused >= 1  # the stolen-server-key client reached ZAP and was denied
        good = dealer(keys)
        await good.send_multipart([b"A", b"gateway"])
        assert await received(5) == [b"A", b"gateway"]
        assert await received(0.5) is None  # nothing of the refused ones arrived later
    finally:
        for sock in clients:
            sock.close(linger=0)
        server.close(linger=0)
        auth.stop()
        server_ctx.term()
        client_ctx.term()
