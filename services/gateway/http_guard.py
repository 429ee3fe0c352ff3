"""ASGI middleware in front of the HTTP API: API keys, admission limits, request body size and
encoding. Each refusal is OpenAI error JSON, decided before any parsing or tokenizing:

    a path but the probes and /metrics without an      401, `WWW-Authenticate: Bearer`
      accepted key (when keys are on)
    generation request past an admission limit         429, `Retry-After`
    generation request while no live worker can take   503 no_workers, `Retry-After`
      it, nor will within route_wait_s (`routable`)
    body over max_body_bytes (by Content-Length, or    413, the connection is closed
      counted while reading a chunked body)              (after reading what the client
                                                         still sends, within LINGER_S and
                                                         LINGER_BYTES: see _linger)
    API body that is not valid UTF-8, or JSON nested   400 invalid_json
      too deeply for a parser (MAX_JSON_DEPTH)
    generation body `check_body` refuses (fields       400 naming the field
      splitserve owns, services/gateway/
      reserved_fields.py; services/gateway/
      body_checks.py)

    /metrics (and /metrics/...) when the gateway     404 metrics_on_their_own_port
      serves its metrics on their own port

A generation request is counted from admission until its response (streamed or not) is
completely sent. A client that stops reading a response cannot hold its slot for ever: once a
write has waited `slow_client_timeout_s` for the client to take data (its socket buffers full:
some megabytes of events on Linux), the app is stopped (the request is aborted on the workers)
and the connection closed. The probes (/health, /ping, /version) and /metrics stay open.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from typing import Any, Awaitable, Callable

from starlette.datastructures import Headers

from services.gateway.admission import RETRY_AFTER_S, Admission
from services.gateway.auth import ApiKeys
from services.gateway.errors import APIError, invalid
from services.gateway.tenancy import current_tenant

log = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses",
                              "/v1/messages", "/inference/v1/generate"})
"""What vLLM's server generates on (each counted by the admission limits)."""

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
"""What stays open with API keys on: probes and metrics."""


NO_WORKERS = APIError(503, "no live worker can serve the request now (the gateway sees no live "
                      "worker of a role it needs); retry later", type="service_unavailable",
                      code="no_workers")


LINGER_S = 2.0
"""Longest a refused oversized body is read on (and dropped) before its 413 is sent."""

LINGER_BYTES = 64 << 20
"""Most bytes of a refused oversized body read on (and dropped) before its 413 is sent."""


MAX_JSON_DEPTH = 256
"""Deepest JSON nesting an API body may have: deeper ones exhaust Python's recursion limit in
the request parser, which FastAPI then answers outside OpenAI's error shape."""


def too_deep(body: bytes) -> bool:
    """Whether a JSON body nests deeper than MAX_JSON_DEPTH (only bodies with that many
    brackets are parsed to find out)."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    try:
        data = json.loads(body)
    except RecursionError:
        return True
    except ValueError:
        return False  # not JSON at all: the app answers that
    level: list[Any] = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return any(isinstance(x, (dict, list)) for x in level)


def is_metrics_path(path: str) -> bool:
    return path == "/metrics" or path.startswith("/metrics/")


def metrics_elsewhere(metrics_port: int) -> APIError:
    return APIError(404, f"/metrics is not served on this port: the gateway serves its metrics "
                    f"on port {metrics_port} (metrics_port)", code="metrics_on_their_own_port")


def needs_key(path: str) -> bool:
    """With API keys on, every path of vLLM's server but the probes and metrics needs one
    (/tokenize and /detokenize too: they are not under /v1 there)."""
    return path not in OPEN_PATHS and not is_metrics_path(path)


async def _linger(receive: Any) -> None:
    """Read and drop the rest of a request body, within LINGER_S and LINGER_BYTES.

    A server that answers and closes while the client is still sending leaves unread bytes in
    its socket: the kernel then resets the connection, and a client that has not read the
    answer yet sees `Connection reset by peer` instead of the 413 (nginx's lingering close
    exists for this). The ASGI server gives no body after the response, so this runs before
    it; past either bound the 413 goes out anyway."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_S
    read = 0
    while read <= LINGER_BYTES:
        left = deadline - loop.time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        read += len(message.get("body", b""))


async def _refuse(err: APIError, scope: Any, receive: Any, send: Any,
                  headers: dict[str, str] | None = None) -> None:
    response = err.response()
    response.headers.update(headers or {})
    await response(scope, receive, send)


class SlowClient(Exception):
    """A response write waited longer than slow_client_timeout_s for the client."""


class GuardMiddleware:
    """Authentication, admission and body limits for one gateway's HTTP app."""

    def __init__(self, app: Any, admission: Admission, api_keys: ApiKeys | None,
                 max_body_bytes: int, generation_paths: frozenset[str] = GENERATION_PATHS,
                 authenticated: Callable[[str], bool] = needs_key,
                 slow_client_timeout_s: float = 0.0,
                 on_slow_client: Callable[[], None] = lambda: None,
                 isolate_tenants: bool = False, metrics_port: int = 0,
                 routable: Callable[[], Awaitable[bool]] | None = None,
                 check_body: Callable[[bytes], APIError | None] = lambda body: None) -> None:
        self.app = app
        self.check_body = check_body  # a generation request's body: an APIError refuses it
        self.routable = routable  # awaits False: generation requests get 503
        self.isolate_tenants = isolate_tenants and api_keys is not None
        self.slow_client_timeout_s = slow_client_timeout_s
        self.on_slow_client = on_slow_client
        self.metrics_port = metrics_port  # > 0: /metrics is refused here (served there)
        self.admission = admission
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self.generation_paths = generation_paths
        self.needs_key = authenticated

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.metrics_port and is_metrics_path(path):
            await _refuse(metrics_elsewhere(self.metrics_port), scope, receive, send)
            return
        headers = Headers(scope=scope)
        client = (scope.get("client") or ("",))[0] or ""
        if self.api_keys is not None and self.needs_key(path):
            try:
                client = self.api_keys.client_of(headers.get("authorization"))
            except APIError as err:
                await _refuse(err, scope, receive, send, {"WWW-Authenticate": "Bearer"})
                return
            if self.isolate_tenants:  # read where the request reaches the engines
                current_tenant.set(self.api_keys.tenant_of(client))
        if path not in self.generation_paths:
            await self._limited_body(scope, receive, send, headers, path)
            return
        if self.routable is not None and not await self.routable():
            await _refuse(NO_WORKERS, scope, receive, send, {"Retry-After": str(RETRY_AFTER_S)})
            return
        if (refusal := self.admission.admit(client)) is not None:
            await _refuse(refusal, scope, receive, send, {"Retry-After": str(RETRY_AFTER_S)})
            return
        try:
            if self.slow_client_timeout_s > 0:
                await self._bounded_writes(scope, receive, send, headers, path)
            else:
                await self._limited_body(scope, receive, send, headers, path)
        finally:
            self.admission.release(client)

    async def _bounded_writes(self, scope: Any, receive: Any, send: Any, headers: Headers,
                              path: str) -> None:
        """Run the request with every body write bounded by slow_client_timeout_s; past it
        the app is stopped (by an exception out of its send) and the server closes the
        connection of the unfinished response."""
        timeout = self.slow_client_timeout_s
        cut = False

        async def bounded_send(message: Any) -> None:
            nonlocal cut
            if message["type"] != "http.response.body":
                await send(message)
                return
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                cut = True
                raise SlowClient(f"the client took no data for {timeout:g} s") from None

        try:
            await self._limited_body(scope, receive, bounded_send, headers, path)
        except BaseException:
            if not cut:  # (the app may wrap SlowClient in an exception group)
                raise
        if not cut:
            return
        # The app's body generator is left suspended at a yield, referenced from the
        # exception's frames (reference cycles): collect the young generations now that the
        # exception is gone, so that it is closed, and the request aborted on the workers, at
        # once rather than at some later collection (vLLM's AsyncLLM aborts as its generator
        # closes).
        gc.collect(1)
        self.on_slow_client()
        log.warning("%s from %s: the client took no data for %g s (slow_client_timeout_s); "
                    "response cut, request aborted", path, (scope.get("client") or ("?",))[0],
                    timeout)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds the limit of {self.max_body_bytes} "
                        "bytes", code="request_too_large")

    async def _limited_body(self, scope: Any, receive: Any, send: Any, headers: Headers,
                            path: str) -> None:
        """Read the whole body (at most max_body_bytes), check it, then run the app on it."""
        limit = self.max_body_bytes
        close = {"Connection": "close"}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _refuse(invalid("invalid Content-Length header"), scope, receive, send,
                              close)
                return
            if int(declared) > limit:
                await _linger(receive)
                await _refuse(self._too_large(), scope, receive, send, close)
                return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _linger(receive)
                await _refuse(self._too_large(), scope, receive, send, close)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        if body and self.needs_key(path):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                await _refuse(invalid(f"the request body is not valid UTF-8 (byte "
                                      f"0x{body[exc.start]:02x} at offset {exc.start})",
                                      code="invalid_json"), scope, receive, send)
                return
            if too_deep(body):
                await _refuse(invalid(f"the request body nests JSON deeper than "
                                      f"{MAX_JSON_DEPTH} levels", code="invalid_json"),
                              scope, receive, send)
                return
        if path in self.generation_paths and (refusal := self.check_body(body)) is not None:
            await _refuse(refusal, scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
