"""Requests in flight and by status (the gateway's `splitserve_gateway_requests_in_flight` and
`splitserve_gateway_requests_total`), as ASGI middleware."""

from __future__ import annotations

from typing import Any

from services.gateway.metrics import GatewayMetrics


class RequestCountMiddleware:
    """Requests in flight and by status, for the whole life of a request: a streamed answer
    counts until its last event is sent. Pure ASGI (a BaseHTTPMiddleware would relay every
    streamed chunk through an extra task and memory stream)."""

    def __init__(self, app: Any, metrics: GatewayMetrics, known_paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            path = scope["path"]
            self.metrics.requests.labels(path if path in self.known_paths else "other",
                                         str(status)).inc()
