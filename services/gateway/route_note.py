"""Route headers (`GatewayConfig.route_headers`): which workers served a generation request, and
why (x-splitserve-*).

vLLM's server starts a streamed response before the request reaches an engine, so the route
is not known when the response's headers are ready. The middleware puts a RouteNote in the
request's context, the remote engine core fills it in when it routes the request (the first
route: a migration later does not change the headers), and the response's start is held until
its first body message, by which time the request has been routed (vLLM sends nothing of a
generation before its first output), then sent with the note's headers.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.gateway.audit_ticket import AuditTicket


@dataclass
class RouteNote:
    """Where one request went (empty until routed)."""

    decode: str = ""
    prefill: str = ""  # "local": the decode worker computed the prompt itself
    reason: str = ""
    audit: "AuditTicket | None" = None  # the routing audit's prediction and the engine's report

    def headers(self) -> list[tuple[bytes, bytes]]:
        if not self.decode:
            return []
        out = {"x-splitserve-decode-worker": self.decode,
               "x-splitserve-prefill-worker": self.prefill, "x-splitserve-route-reason":
               self.reason}
        record = self.audit.record if self.audit is not None else None
        if record is not None:
            out["x-splitserve-predicted-cached-tokens"] = str(record.predicted)
            out["x-splitserve-reported-cached-tokens"] = str(record.reported)
        return [(k.encode(), v.encode("latin-1", "replace")) for k, v in out.items()]


current_route: contextvars.ContextVar[RouteNote | None] = contextvars.ContextVar(
    "splitserve_route", default=None)
"""The note of the request being served (None: nobody asked for route headers)."""


class RouteHeaderMiddleware:
    """ASGI middleware: route headers on the responses of `paths`."""

    def __init__(self, app: Any, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        note = RouteNote()
        held: list[Any] = []

        async def send_with_route(message: Any) -> None:
            if message["type"] == "http.response.start":
                held.append(message)
                return
            if held:
                start = held.pop()
                await send({**start, "headers": [*start.get("headers", ()), *note.headers()]})
            await send(message)

        token = current_route.set(note)
        try:
            await self.app(scope, receive, send_with_route)
        finally:
            current_route.reset(token)
