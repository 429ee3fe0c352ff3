"""The gateway's metrics on a port of their own (`GatewayConfig.metrics_port` > 0): a plain HTTP
listener that serves only GET /metrics (prometheus_client's exposition, routed by Starlette), so
that a network may admit Prometheus to it and not to the API. Both front ends run it in their
event loop; with it on, their API port answers /metrics with 404 (services/gateway/http_guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.routing import Route

METRICS_PATH = "/metrics"

Refresh = Callable[[], Awaitable[None]]


class _Exporter:
    """prometheus_client's ASGI exposition of `registry`, after `refresh` (gauges that are
    read when scraped, e.g. the cluster's pool sizes from Redis)."""

    def __init__(self, registry: CollectorRegistry, refresh: Refresh | None) -> None:
        self._app = make_asgi_app(registry)
        self._refresh = refresh

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._refresh is not None:
            await self._refresh()
        await self._app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn without signal handlers: the process's API server owns SIGINT/SIGTERM and
    stops this one (as vLLM's own launcher does for its servers)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def metrics_app(registry: CollectorRegistry, refresh: Refresh | None = None) -> Starlette:
    """GET /metrics of `registry`; any other path 404, another method 405."""
    return Starlette(routes=[Route(METRICS_PATH, _Exporter(registry, refresh),
                                   methods=["GET"])])


class MetricsListener:
    """The listener, started and stopped by the front end that owns the event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 refresh: Refresh | None = None) -> None:
        self.host = host
        self.port = port
        self._server = _Server(uvicorn.Config(
            metrics_app(registry, refresh), log_level="warning", log_config=None,
            lifespan="off", access_log=False))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve; OSError (with the port in its message) if the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            raise OSError(exc.errno, f"gateway metrics port {self.host}:{self.port}: "
                          f"{exc.strerror}") from None
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the gateway's metrics listener stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
