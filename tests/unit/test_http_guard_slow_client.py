"""The HTTP guard cuts a streaming response whose client stopped reading: a real uvicorn server,
a real socket that never reads. The slot is freed, the app's generator is closed (that is what
aborts a request on the workers) and the server closes the connection."""

from __future__ import annotations

import asyncio
import socket
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from services.gateway.admission import Admission
from services.gateway.http_guard import GuardMiddleware
from services.ports import free_port

CHUNK = b"data: " + b"x" * 16_000 + b"\n\n"


def test_a_client_that_stops_reading_is_cut_and_its_slot_freed() -> None:
    admission = Admission(limit=4)
    state = {"sent": 0, "closed": False, "cut": 0}

    async def endless(request):  # as a token stream that outlives any socket buffer
        async def body():
            try:
                while True:
                    state["sent"] += len(CHUNK)
                    yield CHUNK
                    await asyncio.sleep(0)
            finally:
                state["closed"] = True  # the request's abort on the workers runs here
        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", endless, methods=["POST"])])
    app.add_middleware(GuardMiddleware, admission=admission, api_keys=None,
                       max_body_bytes=1 << 20, slow_client_timeout_s=1.0,
                       on_slow_client=lambda: state.__setitem__("cut", state["cut"] + 1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))

    async def main() -> tuple[float, bytes]:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        try:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                                    b"content-length: 2\r\n\r\n{}")
            t0 = time.monotonic()
            while not state["closed"] and time.monotonic() - t0 < 60:
                await asyncio.sleep(0.1)  # reading nothing
            cut_after = time.monotonic() - t0
            assert admission.in_flight == 0  # the slot is free again
            # the server closed the connection: reading drains the buffers, then EOF
            tail = b""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 30)
                if not data:
                    break
                tail = data[-16:]
            sock.close()
            return cut_after, tail
        finally:
            server.should_exit = True
            await serving

    cut_after, tail = asyncio.run(main())
    assert state["closed"] and state["cut"] == 1
    assert state["sent"] > 1_000_000  # it was the full buffers, not a stalled app
    assert cut_after < 30, cut_after
    assert not tail.endswith(b"0\r\n\r\n")  # no chunked terminator: the cut shows as one
