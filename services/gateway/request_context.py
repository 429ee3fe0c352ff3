"""Per-request context of the gateway's HTTP API: request id, server span, access log.

ASGI middleware, outermost: every request (also one refused by admission or authentication)
gets a request id, from the client's `x-request-id` header when it is valid (else 400 in
OpenAI's error shape) or a new one; the id is bound for everything the request runs (log
records, calls to workers) and returned in the response's `x-request-id` header. With tracing
on, the request is a server span that continues the client's `traceparent`, if any. When the
response is sent, one access-log line records method, path, status, duration and route.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from services import request_id, tracing
from services.gateway.errors import invalid

log = logging.getLogger("splitserve.access")

# Polled endpoints: logged at DEBUG so scrapes and probes do not drown requests.
QUIET_PATHS = frozenset({"/metrics", "/health"})
ROUTE_HEADERS = ("x-splitserve-decode-worker", "x-splitserve-prefill-worker",
                 "x-splitserve-route-reason", "x-splitserve-predicted-cached-tokens",
                 "x-splitserve-reported-cached-tokens")
_COUNT_HEADERS = frozenset({"x-splitserve-predicted-cached-tokens",
                            "x-splitserve-reported-cached-tokens"})


class RequestContextMiddleware:
    """Request id, tracing span and access log around every HTTP request."""

    def __init__(self, app: Any, route_headers: bool = False) -> None:
        self.app = app
        self.route_headers = route_headers  # False: read for the log, not sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        sent = headers.get(request_id.HEADER)
        try:
            rid = request_id.validate(sent) if sent is not None else request_id.new()
        except request_id.InvalidRequestId as exc:
            response = invalid(str(exc), param=request_id.HEADER,
                               code="invalid_request_id").response()
            await response(scope, receive, send)
            log.info("%s %s 400 (invalid %s)", scope["method"], scope["path"], request_id.HEADER,
                     extra={"method": scope["method"], "path": scope["path"], "status": 400})
            return
        start = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "route": {}}

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                out = []
                for k, v in message.get("headers", ()):
                    name = k.decode("latin-1").lower()
                    if name in ROUTE_HEADERS:
                        field = name.removeprefix("x-splitserve-").replace("-", "_")
                        value = v.decode("latin-1")
                        state["route"][field] = (int(value) if name in _COUNT_HEADERS
                                                 and value.isdigit() else value)
                        if not self.route_headers:
                            continue
                    out.append((k, v))
                out.append((request_id.HEADER.encode(), rid.encode()))
                message = {**message, "headers": out}
            await send(message)

        method, path = scope["method"], scope["path"]
        with request_id.bound(rid), tracing.tracer().start_as_current_span(
                f"{method} {path}", context=tracing.extract(headers), kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": path,
                            "splitserve.request_id": rid}) as span:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                status = state["status"]
                span.set_attribute("http.response.status_code", status)
                for k, v in state["route"].items():
                    span.set_attribute(f"splitserve.{k}", v)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                ms = round((time.perf_counter() - start) * 1e3, 1)
                log.log(logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                        "%s %s %d %.1fms", method, path, status, ms,
                        extra={"method": method, "path": path, "status": status,
                               "duration_ms": ms, **state["route"]})
