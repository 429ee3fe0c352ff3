"""The engine link between a gateway and a worker: vLLM's own engine-core messages on ZeroMQ.

The gateway's front end (vLLM's serving layer, tokenizer, detokenizer, stop strings) makes
vLLM's `EngineCoreRequest`s and consumes `EngineCoreOutputs`, exactly as vLLM's API server does
with its engine-core process; the link carries them between machines with vLLM's msgpack codec
(`vllm/v1/serial_utils.py`). A worker binds one ROUTER socket; each gateway connects one DEALER
socket per worker, so every gateway's requests to a worker share one connection, and a worker
sends one message per engine step per gateway with the outputs of all that gateway's requests.

Frames (multipart), gateway -> worker: `ADD` + the encoded `EngineCoreRequest`, or `ABORT` +
a msgpack list of request ids. Worker -> gateway: `OUTPUTS` + the encoded `EngineCoreOutputs`,
`FAILED` + msgpack `[request_id, message]` when a request could not be added (the request's
fault: it is not retried), or `LOST` + msgpack `[request_ids, message]` when the worker's
engine died under those requests (the gateway continues them on another worker).

A worker that dies outright sends nothing: the gateway's socket sees the connection drop
(ZeroMQ's socket monitor), or the link's heartbeats time out (`HEARTBEAT_IVL_MS`,
`HEARTBEAT_TIMEOUT_MS`) for a host or process that stops answering.
The link is authenticated and encrypted with ZeroMQ CURVE: the worker's (server) and the
gateways' (client) keypairs are derived from the cluster secret (`LinkKeys.derive`), a gateway
only connects to a server holding the derived server key, and the worker's ZAP handler
(`LinkAuthenticator`) admits only the derived client key. A peer without the secret completes
no handshake: nothing it sends reaches the engine. A pyzmq without CURVE (libsodium) is refused
at start (`require_curve`), never served in the clear.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

import zmq
import zmq.auth.asyncio

from services.cluster_secret import LINK_CLIENT_KEY, LINK_SERVER_KEY, ClusterSecret

log = logging.getLogger(__name__)

ADD = b"A"
ABORT = b"X"
OUTPUTS = b"O"
FAILED = b"F"
LOST = b"L"

HEARTBEAT_IVL_MS = 2000
"""ZMTP heartbeats on the link (answered by ZeroMQ's I/O thread, not by Python: a busy
engine step does not miss them)"""
HEARTBEAT_TIMEOUT_MS = 10000
"""a peer silent this long is disconnected (its requests move to another worker)"""

class LinkSecurityError(RuntimeError):
    """The engine link cannot be secured (no CURVE in this pyzmq/libzmq)."""


def require_curve() -> None:
    """Raise LinkSecurityError unless this libzmq can do CURVE."""
    if not zmq.has("curve"):
        raise LinkSecurityError(
            f"libzmq {zmq.zmq_version()} (pyzmq {zmq.__version__}) has no CURVE support: the "
            "engine link is never served unauthenticated; install a pyzmq wheel (it bundles "
            "libsodium)")


ZAP_DOMAIN = "splitserve-link"
"""The ZAP domain of a worker's link socket (its authenticator answers for it)."""


@dataclass(frozen=True)
class LinkKeys:
    """CURVE keypairs (Z85 text, as libzmq takes them) of both ends of the link."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def __repr__(self) -> str:
        return "LinkKeys(<hidden>)"

    @classmethod
    def derive(cls, secret: ClusterSecret) -> "LinkKeys":
        """The cluster's link keys: secret key = HMAC-SHA256(cluster secret, purpose), public
        key from it (any 32 bytes are a Curve25519 secret key)."""
        require_curve()
        server_secret = zmq.utils.z85.encode(secret.derive(LINK_SERVER_KEY))
        client_secret = zmq.utils.z85.encode(secret.derive(LINK_CLIENT_KEY))
        return cls(server_public=zmq.curve_public(server_secret), server_secret=server_secret,
                   client_public=zmq.curve_public(client_secret), client_secret=client_secret)

    def secure_server(self, sock: zmq.Socket) -> None:
        """Make `sock` (before bind) a CURVE server with the cluster's server key."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def secure_client(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of the cluster's link servers."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public



class LinkAuthenticator:
    """The ZAP handler of a worker's link context: admits the cluster's client key only."""

    def __init__(self, ctx: zmq.Context, keys: LinkKeys) -> None:
        self._allowed = keys.client_public
        self.refused = 0
        self._auth = zmq.auth.asyncio.AsyncioAuthenticator(ctx)
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def start(self) -> None:
        self._auth.start()

    def stop(self) -> None:
        self._auth.stop()

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: whether a client's (Z85) public key may in."""
        if hmac.compare_digest(key, self._allowed):
            return True
        self.refused += 1
        log.warning("engine link: refused a client key that is not the cluster's")
        return False
