"""The two places the vLLM front end touches vLLM internals (docs/architecture.md, "The vLLM
front end"): these fail when the pinned vLLM changes under them; the conformance suite
(tests/e2e/test_vllm_frontend.py) shows they work."""

from __future__ import annotations

import inspect


def test_asyncllm_takes_its_engine_core_client_from_the_factory() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import EngineCoreClient

    assert isinstance(EngineCoreClient.__dict__["make_async_mp_client"], staticmethod)
    assert "EngineCoreClient.make_async_mp_client(" in inspect.getsource(AsyncLLM.__init__)


def test_asyncllm_output_handler_pulls_from_its_engine_core() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    source = inspect.getsource(AsyncLLM._run_output_handler)
    assert "if self.output_handler is not None:" in source
    assert "await engine_core.get_output_async()" in source
    assert "self.output_handler = asyncio.create_task(" in source


def test_what_the_remote_core_serves_is_all_asyncllm_asks_on_the_request_path() -> None:
    """AsyncLLM's calls on its engine core along generate/abort/health are the remote core's."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.gateway.remote_core import RemoteEngineCore

    used = {"add_request_async", "abort_requests_async", "get_output_async",
            "get_supported_tasks_async"}
    source = inspect.getsource(AsyncLLM)
    for name in used:
        assert f"engine_core.{name}(" in source, name
        assert callable(getattr(RemoteEngineCore, name))
    assert "self.engine_core.resources.engine_dead" in source


def test_vllms_server_makes_middleware_classes_with_the_app_alone() -> None:
    """The gateway's guard (API keys, admission, body limits) goes in through vLLM's
    `--middleware` setting, which adds a class with no arguments: FrontendGuard takes its
    gateway from a class attribute for that reason."""
    from vllm.entrypoints.serve.middleware import register

    source = inspect.getsource(register.init_entrypoints_middleware)
    assert "for middleware in args.middleware:" in source
    assert "app.add_middleware(imported)" in source


def test_the_front_ends_build_and_serve_follows_vllms() -> None:
    """services/gateway/vllm_frontend.build_and_serve is vLLM's own (build the app, fill its
    state, serve it), keeping the app state for the gRPC API: vLLM's must still be those steps
    with those settings, and its serving objects where the gRPC servicer reads them."""
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.openai.chat_completion import api_router as chat_router
    from vllm.entrypoints.openai.completion import api_router as completion_router

    source = inspect.getsource(entry.build_and_serve)
    for step in ("app = build_app(args, supported_tasks, model_config)",
                 "await init_app_state(engine_client, app.state, args, supported_tasks)",
                 "return await serve_http(", "log_config = get_uvicorn_log_config(args)"):
        assert step in source, step
    ours = inspect.getsource(__import__("services.gateway.vllm_frontend",
                                        fromlist=["build_and_serve"]).build_and_serve)
    for setting in ("enable_ssl_refresh", "uvicorn_log_level", "disable_uvicorn_access_log",
                    "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "ssl_keyfile", "ssl_certfile",
                    "ssl_ca_certs", "ssl_cert_reqs", "ssl_ciphers",
                    "h11_max_incomplete_event_size", "h11_max_header_count"):
        assert setting in source and setting in ours, setting
    assert "request.app.state.openai_serving_chat" in inspect.getsource(chat_router)
    assert "state.openai_serving_completion" in inspect.getsource(completion_router)


def test_server_args_add_the_guard_to_vllms_middleware() -> None:
    from services.gateway.config import GatewayConfig
    from services.gateway.http_guard import needs_key
    from services.gateway.vllm_frontend import (CONTEXT, COUNT, GUARD, FrontendGuard,
                                                server_args)

    args = server_args(GatewayConfig(model="m", redis_url="redis://127.0.0.1:1/0",
                                     frontend_args={"middleware": ["a.b.C"]}))
    assert args.middleware == ["a.b.C", GUARD, COUNT, CONTEXT]  # vLLM: the last is outermost
    assert GUARD.rsplit(".", 1)[1] == FrontendGuard.__name__
    assert needs_key("/tokenize") and needs_key("/v1/models") and needs_key("/pause")
    assert not needs_key("/health") and not needs_key("/metrics")


def test_the_first_output_carries_the_engines_own_prefix_cache_hit() -> None:
    """The routing audit reads `EngineCoreOutput.prefill_stats.num_local_cached_tokens` of
    the computing worker's first output (services/gateway/audit_ticket.py), and vLLM's
    metrics serve the registry the vLLM front end adds the gateway's metrics to."""
    import dataclasses

    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.metrics.prometheus import get_prometheus_registry
    from vllm.v1.metrics.stats import PrefillStats

    assert "prefill_stats" in EngineCoreOutput.__struct_fields__
    assert "num_local_cached_tokens" in {f.name for f in dataclasses.fields(PrefillStats)}
    assert callable(get_prometheus_registry)
