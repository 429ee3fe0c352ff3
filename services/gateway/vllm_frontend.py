"""The gateway's front end: vLLM's own OpenAI server
(its protocol models, chat templates, tool-call and reasoning parsers, structured-output
checks, logprobs, `n`, /tokenize, /detokenize, /v1/responses, ...) over the cluster.

vLLM's server runs an `AsyncLLM` whose engine-core client talks to one local engine-core
process. Here the `AsyncLLM` is vLLM's own, with its front half (input processor, output
processor with the incremental detokenizer, stop strings and logprobs) in the gateway, and its
engine-core client replaced by services/gateway/remote_core.py, which routes each request and
runs the prefill -> KV -> decode handoff over the workers' engine links. Its server settings
are vLLM's server flags, by vLLM's names (`frontend_args`: tool_call_parser,
enable_auto_tool_choice, reasoning_parser, chat_template, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from services.cluster_secret import ClusterSecretError
from services.gateway.auth import ApiKeyError
from services.gateway.config import GatewayConfig
from services.gateway.http_guard import (GENERATION_PATHS, NO_WORKERS, GuardMiddleware,
                                         needs_key)
from services.gateway.request_context import RequestContextMiddleware
from services.gateway.request_count import RequestCountMiddleware
from services.gateway.body_checks import frontend_body_refusal
from services.gateway.route_note import RouteHeaderMiddleware
from services.worker.engine_args import EngineArgsError, cli_tokens, server_parser

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.gateway.gateway import Gateway
    from services.gateway.metrics import GatewayMetrics
    from services.gateway.remote_core import RemoteEngineCore

log = logging.getLogger(__name__)


class FrontendGuard(GuardMiddleware):
    """The gateway's API keys, admission limits and body limits (services/gateway/http_guard.py)
    in front of vLLM's server, through vLLM's own `--middleware` setting, which makes a
    middleware class with the app alone: the serving gateway is a class attribute, set
    before the app is built."""

    gateway: ClassVar["Gateway | None"] = None

    def __init__(self, app: Any) -> None:
        gw = FrontendGuard.gateway
        if gw is None:
            raise RuntimeError("FrontendGuard needs the serving gateway (set by run())")
        super().__init__(app, gw.admission, gw.api_keys, gw.cfg.max_body_bytes,
                         GENERATION_PATHS, needs_key, gw.cfg.slow_client_timeout_s,
                         gw.metrics.slow_clients_cut.inc, gw.cfg.tenant_isolation,
                         metrics_port=gw.cfg.metrics_port, routable=self._can_route,
                         check_body=frontend_body_refusal)
        self._gateway = gw

    async def _can_route(self) -> bool:
        return await self._gateway.can_route()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """vLLM's /health says whether its engine client is alive; here it also says whether
        the cluster has a decode-capable worker to route to (503 no_workers), so that a
        readiness probe takes a gateway with no live workers out of service."""
        if (scope["type"] == "http" and scope.get("path") == "/health"
                and not self._gateway.serving):
            await NO_WORKERS.response()(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("path") == "/metrics" and not self.metrics_port:
            await self._gateway.refresh_gauges()  # live workers, pool sizes: before a scrape
        await super().__call__(scope, receive, send)


GUARD = f"{FrontendGuard.__module__}.{FrontendGuard.__qualname__}"


class FrontendRouteHeaders(RouteHeaderMiddleware):
    """Route headers (`route_headers`) on vLLM's generation paths, through `--middleware`."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, GENERATION_PATHS)


ROUTE_HEADERS = f"{FrontendRouteHeaders.__module__}.{FrontendRouteHeaders.__qualname__}"


class FrontendRequestCount(RequestCountMiddleware):
    """Requests in flight and by status (services/gateway/request_count.py), through
    `--middleware`."""

    def __init__(self, app: Any) -> None:
        gw = FrontendGuard.gateway
        if gw is None:
            raise RuntimeError("FrontendRequestCount needs the serving gateway (set by run())")
        super().__init__(app, gw.metrics, set(GENERATION_PATHS | {"/v1/models", "/health",
                                                                  "/metrics"}))


class FrontendRequestContext(RequestContextMiddleware):
    """Request id (`x-request-id`, which vLLM's server also takes for its request ids),
    server span and access log (services/gateway/request_context.py), outermost, through
    `--middleware`."""

    def __init__(self, app: Any) -> None:
        gw = FrontendGuard.gateway
        super().__init__(app, route_headers=bool(gw is not None and gw.cfg.route_headers))


COUNT = f"{FrontendRequestCount.__module__}.{FrontendRequestCount.__qualname__}"
CONTEXT = f"{FrontendRequestContext.__module__}.{FrontendRequestContext.__qualname__}"


def server_args(cfg: GatewayConfig) -> argparse.Namespace:
    """vLLM's server settings of this gateway: the engines' arguments (so that the front end
    validates requests against the engines' own configuration), then the front-end ones."""
    parser = server_parser()
    tokens = ["--model", cfg.model, "--served-model-name", cfg.name,
              "--max-model-len", str(cfg.max_model_len), "--host", cfg.host,
              "--port", str(cfg.port), "--uvicorn-log-level", "warning",
              "--disable-uvicorn-access-log"]
    tokens += cli_tokens(cfg.engine_args) + cli_tokens(cfg.frontend_args, parser)
    args = parser.parse_args(tokens)
    # vLLM adds them in this order: the last is outermost
    args.middleware = [*(args.middleware or []), GUARD,
                       *([ROUTE_HEADERS] if cfg.route_headers else []), COUNT, CONTEXT]
    return args


def check_frontend_args(args: dict[str, Any]) -> None:
    """Raise EngineArgsError naming the first vLLM server setting its parser refuses."""
    from services.worker.engine_args import parse

    parse(args, "frontend_args", parser=server_parser())


@contextlib.contextmanager
def _engine_core_client(core: "RemoteEngineCore") -> Iterator[None]:
    """While constructing an AsyncLLM: its engine-core client is `core` (vLLM internals:
    `EngineCoreClient.make_async_mp_client`; tests/unit/test_vllm_seam.py fails when
    it changes)."""
    from vllm.v1.engine.core_client import EngineCoreClient

    original = EngineCoreClient.__dict__["make_async_mp_client"]
    EngineCoreClient.make_async_mp_client = staticmethod(lambda **_: core)  # type: ignore
    try:
        yield
    finally:
        EngineCoreClient.make_async_mp_client = original  # type: ignore[assignment]


def remote_async_llm(args: argparse.Namespace, core: "RemoteEngineCore",
                     metrics: "GatewayMetrics | None" = None) -> "AsyncLLM":
    """vLLM's AsyncLLM for these server settings, over the cluster; its per-request figures
    also go into `metrics` (services/gateway/request_stats.py)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor import Executor

    from services.gateway.request_stats import gateway_stat_logger

    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
        UsageContext.OPENAI_API_SERVER)
    with _engine_core_client(core):
        return AsyncLLM(vllm_config, executor_class=Executor, log_stats=not args.disable_log_stats,
                        usage_context=UsageContext.OPENAI_API_SERVER,
                        log_requests=args.enable_log_requests,
                        stat_loggers=[gateway_stat_logger(metrics)] if metrics else None)


def serve_gateway_metrics(registry: "CollectorRegistry") -> "CollectorRegistry":
    """The gateway's own metrics (routing, the routing audit, ...) on vLLM's /metrics, next to
    vLLM's: vLLM's server serves the registry vLLM's metrics live in, which is returned (with
    `metrics_port` the gateway's metrics listener serves it instead)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    served = get_prometheus_registry()
    served.register(registry)
    return served


def document_error_codes(app: Any) -> None:
    """The app's OpenAPI document as it answers errors: every operation may answer an error
    (the gateway's refusals: API keys, admission and body limits, no workers, services/
    gateway/http_guard.py; and vLLM's own, e.g. 404 for an unknown response id, which vLLM's
    document leaves out), each as OpenAI error JSON (a `default` response); and its
    ErrorInfo.code is an integer (vLLM's: the HTTP status) or a string (the gateway's
    refusals carry OpenAI's string codes: `invalid_api_key`, `rate_limited`, `no_workers`)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schemas = schema.get("components", {}).get("schemas", {})
        info = schemas.get("ErrorInfo", {})
        code = info.get("properties", {}).get("code")
        if code is not None and "anyOf" not in code:
            info["properties"]["code"] = {"anyOf": [{"type": "integer"}, {"type": "string"}],
                                          "title": code.get("title", "Code")}
        if "ErrorResponse" in schemas:
            error = {"description": "an error, as OpenAI error JSON", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if isinstance(operation, dict) and "responses" in operation:
                        operation["responses"].setdefault("default", error)
        return schema

    app.openapi = openapi


async def build_frontend_app(engine: "AsyncLLM", args: argparse.Namespace) -> Any:
    """vLLM's OpenAI app over `engine`, its state filled (its serving objects also answer the
    gRPC API): the first two steps of vLLM's own `build_and_serve` (vllm/entrypoints/launchers/
    api_server/entry.py), with the OpenAPI document saying how errors are answered."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    document_error_codes(app)
    await init_app_state(engine, app.state, args, supported_tasks)
    return app


async def build_and_serve(engine: "AsyncLLM", listen_address: str, sock: Any,
                          args: argparse.Namespace, gateway: "Gateway") -> tuple[Any, Any]:
    """vLLM's own `build_and_serve` (build the app, fill its state, serve it), keeping the app
    state, whose serving objects also answer the gRPC API when the gateway has a grpc_port.
    Returns (the server's shutdown task, the gRPC server or None)."""
    from vllm import envs
    from vllm.entrypoints.launchers.launcher import serve_http
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    app = await build_frontend_app(engine, args)
    grpc_server = None
    cfg = gateway.cfg
    if cfg.grpc_port:
        from services.gateway.grpc_api import start_grpc_server

        grpc_server = await start_grpc_server(gateway, app.state, cfg.host, cfg.grpc_port)
    log_config = get_uvicorn_log_config(args)
    kwargs = {"log_config": log_config} if log_config is not None else {}
    shutdown = await serve_http(
        app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host,
        port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs, ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count, **kwargs)
    return shutdown, grpc_server


async def run(cfg: GatewayConfig) -> None:
    """Serve until SIGINT/SIGTERM."""
    from vllm.entrypoints.launchers.launcher import setup_server

    from services.gateway.gateway import Gateway
    from services.gateway.remote_core import RemoteEngineCore
    from services.gateway.tenancy import TenantSalts

    args = server_args(cfg)
    gateway = Gateway(cfg)  # Redis, the worker directory, the routing policy, API keys
    keys = gateway.api_keys
    log.info("API keys: %s", f"on ({len(keys)} accepted)" if keys else
             "off (any client is served; see docs/operations.md)")
    if cfg.tenant_isolation:
        log.info("tenant isolation: %s", f"on ({keys.tenants} tenants, a prefix cache each)"
                 if keys else "off (it needs API keys)")
    await gateway.start()
    FrontendGuard.gateway = gateway
    assert gateway.directory is not None and gateway.route_stage is not None
    salts = TenantSalts(gateway.secret)  # a client's cache_salt, or its tenant's
    core = RemoteEngineCore(gateway.directory, gateway.route_stage, salts,
                            request_timeout_s=cfg.request_timeout_s)
    listener = gateway.metrics_listener(serve_gateway_metrics(gateway.metrics.registry))
    engine = remote_async_llm(args, core, gateway.metrics)
    listen_address, sock = setup_server(args, reuse_port=False)
    grpc_server = None
    try:
        if listener is not None:  # vLLM's /metrics port answers 404 then (FrontendGuard)
            await listener.start()
        shutdown, grpc_server = await build_and_serve(engine, listen_address, sock, args,
                                                      gateway)
        log.info("vLLM front end serving on %s", listen_address)
        await shutdown
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        if listener is not None:
            await listener.stop()
        sock.close()
        engine.shutdown()
        await gateway.stop()


def serve(cfg: GatewayConfig) -> None:
    """Run the gateway's vLLM front end (blocks until SIGINT/SIGTERM)."""
    from services import tracing
    from services.logs import LogConfig, configure_logging
    from services.tracing import TracingConfig

    with contextlib.suppress(ImportError):
        # vLLM's server imports it, and at import it sets the root logger (and its handlers)
        # to ERROR, silencing every splitserve line of this process: let it, then configure.
        import model_hosting_container_standards.logging_config  # noqa: F401
    configure_logging(LogConfig(), component="gateway")
    tracing.setup(TracingConfig(), "splitserve-gateway")
    try:
        server_args(cfg)
        asyncio.run(run(cfg))
    except (EngineArgsError, ApiKeyError, ClusterSecretError) as exc:
        raise SystemExit(f"splitserve gateway: {exc}") from None
