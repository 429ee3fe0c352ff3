"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics (or /metrics on a port of its own: services/gateway/metrics_listener.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from router.policies import make_policy
from router.prefix_index import PrefixIndex
from router.redis_client import RedisClientConfig, RedisHealth, redis_client, stop_task
from router.registry import WorkerRole
from services import tracing
from services.cluster_secret import ClusterSecret, ClusterSecretError
from services.logs import LogConfig, configure_logging
from services.tracing import TracingConfig
from services.gateway.admission import Admission
from services.gateway.auth import ApiKeyError, ApiKeys
from services.gateway.cluster_metrics import ClusterGauges
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError, install_error_handlers, invalid
from services.gateway.http_guard import GENERATION_PATHS, GuardMiddleware
from services.gateway.metrics import GatewayMetrics, StreamTimer
from services.gateway.pd_flow import GenerationResult, PDFlow, WorkerUnavailable
from services.gateway.request_context import RequestContextMiddleware
from services.gateway.request_count import RequestCountMiddleware
from services.gateway.sse import DONE, ChunkEncoder
from services.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    new_id,
    now,
    vllm_request_defaults,
)
from services.gateway.tokenization import PromptBuilder
from services.proto.v1 import worker_pb2 as pb
from services.gateway.worker_directory import WorkerDirectory

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from services.gateway.metrics_listener import MetricsListener

log = logging.getLogger(__name__)
T = TypeVar("T")

Kind = Literal["completion", "chat"]


@dataclass
class PreparedRequest:
    """A validated request, tokenized, ready for the PD flow."""

    kind: Kind
    request_id: str
    token_ids: list[int]
    sampling: pb.SamplingParams
    stream: bool
    include_usage: bool
    received_at: float
    """time.perf_counter() when the gateway began handling the request (before tokenizing):
    where TTFT and end-to-end latency start."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def route_headers(result: GenerationResult) -> dict[str, str]:
    """Where the request went, for operators and clients that debug routing."""
    r = result.route
    if r is None:
        return {}
    headers = {"x-splitserve-decode-worker": r.decode.worker_id,
               "x-splitserve-prefill-worker": r.prefill.worker_id if r.prefill else "local",
               "x-splitserve-route-reason": r.reason}
    if result.audit is not None and result.audit.record is not None:
        rec = result.audit.record  # the routing audit (docs/routing.md)
        headers["x-splitserve-predicted-cached-tokens"] = str(rec.predicted)
        headers["x-splitserve-reported-cached-tokens"] = str(rec.reported)
    return headers


class Gateway:
    """State of one gateway process and its request handling."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.api_keys = ApiKeys.load(cfg.api_keys_file, cfg.api_keys_env)
        self.secret = ClusterSecret.required("the gateway")  # its credential with workers
        self.metrics = GatewayMetrics(cfg.route_audit_window)
        self.cluster_gauges = ClusterGauges(self.metrics)
        self.admission = Admission(cfg.max_in_flight, cfg.max_in_flight_per_client)
        self.builder = PromptBuilder(cfg.model)
        self.redis: Redis | None = None
        self.directory: WorkerDirectory | None = None
        self.flow: PDFlow | None = None
        self._purge_task: asyncio.Task | None = None

    async def start(self) -> None:
        for kind in ("chat", "completion"):  # vLLM's request models, imported once, now
            vllm_request_defaults(kind)
        redis_cfg = RedisClientConfig()
        self.redis = redis_client(self.cfg.redis_url, redis_cfg)
        self.directory = WorkerDirectory(self.redis, self.cfg.namespace, self.cfg.name,
                                         self.secret, self.cfg.worker_refresh_s,
                                         streams=self.cfg.worker_streams,
                                         health=RedisHealth.from_config(redis_cfg))
        try:
            await self.directory.refresh()
        except Exception:
            log.warning("registry not reachable at start; will keep trying", exc_info=True)
        await self.directory.start()
        policy = make_policy(self.cfg.policy, self.cfg.kv_policy)
        index = PrefixIndex(self.redis, self.cfg.namespace) if policy.uses_prefix_index else None
        self.flow = PDFlow(self.directory, policy, index, self.metrics,
                           self.cfg.request_timeout_s, self.cfg.migration)
        if index is not None:
            self._purge_task = asyncio.create_task(self._purge_dead_workers(index))

    async def _purge_dead_workers(self, index: PrefixIndex) -> None:
        """Delete the index entries of workers whose liveness expired. Lookups ignore them
        already; this only reclaims Redis memory (idempotent: any gateway may do it)."""
        while True:
            await asyncio.sleep(self.cfg.index_purge_interval_s)
            try:
                if purged := await index.purge_dead():
                    log.info("purged index entries of dead workers %s", purged)
            except Exception:
                log.warning("index purge failed; will retry", exc_info=True)

    async def refresh_gauges(self) -> None:
        """Before a scrape: the cluster gauges (live workers, pool sizes from Redis)."""
        d = self.directory
        await self.cluster_gauges.observe(d, self.redis, self.cfg.namespace,
                                          d.health if d else None)

    def metrics_listener(self, registry: "CollectorRegistry") -> "MetricsListener | None":
        """The listener of `registry` on cfg.metrics_port (None when it is 0)."""
        if not self.cfg.metrics_port:
            return None
        from services.gateway.metrics_listener import MetricsListener

        return MetricsListener(registry, self.cfg.host, self.cfg.metrics_port,
                               self.refresh_gauges)

    async def stop(self) -> None:
        if self._purge_task is not None:
            await stop_task(self._purge_task)
        if self.directory:
            await self.directory.stop()
        if self.redis:
            await self.redis.aclose()

    # --- validation ------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.cfg.name:
            raise APIError(404, f"The model `{model}` does not exist. Served: `{self.cfg.name}`.",
                           param="model", code="model_not_found")

    def _check_ids(self, ids: list[int]) -> None:
        vocab = self.builder.vocab_size
        bad = next((t for t in ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise invalid(f"token id {bad} is out of range [0, {vocab})", param="prompt")

    def _check_stop(self, stops: list[str]) -> None:
        most, chars = self.cfg.max_stop_sequences, self.cfg.max_stop_chars
        if len(stops) > most:
            raise invalid(f"at most {most} stop sequences are allowed (got {len(stops)})",
                          param="stop")
        if any(len(s) > chars for s in stops):
            raise invalid(f"stop sequences must be at most {chars} characters long",
                          param="stop")

    async def prepare(self, req: CompletionRequest | ChatCompletionRequest, kind: Kind
                      ) -> PreparedRequest:
        received_at = time.perf_counter()
        self._check_model(req.model)
        if (feature := req.unsupported()) is not None:
            raise invalid(f"`{feature}` is not supported by this server", param=feature,
                          code="unsupported_parameter")
        self._check_stop(req.stop)
        if isinstance(req, ChatCompletionRequest):
            try:
                ids = await self.builder.chat(req.messages)
            except ValueError as exc:
                raise invalid(str(exc), param="messages") from None
            limit = req.token_limit
        else:
            ids = await self._completion_ids(req.prompt)
            limit = req.max_tokens
        ctx = self.cfg.max_model_len
        if not ids:
            raise invalid("the prompt is empty (no tokens)", param="messages" if kind == "chat"
                          else "prompt")
        if len(ids) >= ctx:
            raise invalid(f"This model's maximum context length is {ctx} tokens. However, your "
                          f"prompt is {len(ids)} tokens.", param="messages" if kind == "chat"
                          else "prompt", code="context_length_exceeded")
        if limit is None:
            limit = ctx - len(ids)
        elif len(ids) + limit > ctx:
            raise invalid(f"This model's maximum context length is {ctx} tokens. However, you "
                          f"requested {len(ids) + limit} tokens ({len(ids)} in the prompt, "
                          f"{limit} for the completion). Reduce the prompt or max_tokens.",
                          param="max_tokens", code="context_length_exceeded")
        sampling = pb.SamplingParams(max_tokens=limit, temperature=req.temperature,
                                     top_p=req.top_p, stop=req.stop, ignore_eos=req.ignore_eos)
        if req.seed is not None:
            sampling.seed = req.seed
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return PreparedRequest(kind=kind, request_id=new_id(prefix), token_ids=ids,
                               sampling=sampling, stream=req.stream,
                               include_usage=bool(req.stream_options
                                                  and req.stream_options.include_usage),
                               received_at=received_at)

    async def _completion_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise invalid("batched prompts are not supported: send one prompt per request",
                              param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return await self.builder.text(prompt)
        if not prompt:
            raise invalid("prompt must not be an empty list of tokens", param="prompt")
        ids = list(prompt)
        self._check_ids(ids)
        return ids

    # --- responses -------------------------------------------------------------------------
    def _usage(self, r: GenerationResult) -> dict[str, Any]:
        return {"prompt_tokens": r.num_prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.num_prompt_tokens + r.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": r.num_cached_tokens}}

    def _record(self, route: str, result: GenerationResult) -> None:
        m = self.metrics
        m.prompt_tokens.inc(result.num_prompt_tokens)
        m.cached_tokens.inc(result.num_cached_tokens)
        m.completion_tokens.inc(result.completion_tokens)

    async def complete(self, p: PreparedRequest, request: Request) -> JSONResponse:
        """Non-streaming: collect the whole output."""
        assert self.flow is not None
        route = f"/v1/{'chat/' if p.kind == 'chat' else ''}completions"
        result = GenerationResult()
        start = p.received_at
        texts: list[str] = []

        async def collect() -> None:
            first = True
            async for chunk in self.flow.stream(p.request_id, p.token_ids, p.sampling, result):
                if first and chunk.token_ids:
                    self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                    first = False
                texts.append(chunk.text)

        try:
            await _unless_disconnected(collect(), request)
        except WorkerUnavailable as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        except ValueError as exc:
            raise invalid(str(exc)) from None
        self.metrics.e2e.labels(route).observe(time.perf_counter() - start)
        self._record(route, result)
        text = "".join(texts)
        finish = result.finish_reason or "stop"
        if p.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse({"id": p.request_id, "object": obj, "created": now(),
                             "model": self.cfg.name, "choices": [choice],
                             "usage": self._usage(result)}, headers=route_headers(result))

    async def stream(self, p: PreparedRequest, request: Request) -> StreamingResponse:
        """Streaming: server-sent events, OpenAI's chunk format, `data: [DONE]` at the end."""
        assert self.flow is not None
        route = f"/v1/{'chat/' if p.kind == 'chat' else ''}completions"
        result = GenerationResult()
        start = p.received_at
        chunks = self.flow.stream(p.request_id, p.token_ids, p.sampling, result)
        # Wait for the first chunk before answering, so routing and worker failures still get
        # a proper HTTP status instead of an error inside a 200 stream.
        # A client that leaves before the first token has its request aborted on the workers
        # (the generator is closed), not run to its end for nobody.
        try:
            first = await _unless_disconnected(chunks.__anext__(), request)
        except StopAsyncIteration:
            first = None
        except WorkerUnavailable as exc:
            await chunks.aclose()
            raise APIError(503, str(exc), type="service_unavailable") from None
        except ValueError as exc:
            await chunks.aclose()
            raise invalid(str(exc)) from None
        except APIError:
            await chunks.aclose()
            raise
        timer = StreamTimer(self.metrics, route, start)
        timer.chunk(first is not None and bool(first.token_ids))
        sse = ChunkEncoder(p.request_id, now(), self.cfg.name, chat=p.kind == "chat",
                           include_usage=p.include_usage)

        async def body() -> AsyncIterator[str]:
            try:
                if sse.chat:
                    yield sse.event([sse.choice("", None, role=True)])
                pending = [first] if first is not None else []
                while True:
                    for chunk in pending:
                        if chunk.text or chunk.finish_reason:
                            yield sse.content(chunk.text, chunk.finish_reason or None)
                    try:
                        pending = [await chunks.__anext__()]
                    except StopAsyncIteration:
                        break
                    timer.chunk(bool(pending[0].token_ids))
                if p.include_usage:
                    yield sse.event([], self._usage(result))
                yield DONE
                self.metrics.e2e.labels(route).observe(time.perf_counter() - start)
                self._record(route, result)
            except (WorkerUnavailable, ValueError) as exc:
                err = APIError(503 if isinstance(exc, WorkerUnavailable) else 400, str(exc),
                               type="service_unavailable" if isinstance(exc, WorkerUnavailable)
                               else "invalid_request_error")
                yield f"data: {_dumps(err.body())}\n\n"
                yield DONE
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **route_headers(result)})


async def _unless_disconnected(work: Awaitable[T], request: Request,
                               poll_s: float = 0.5) -> T:
    """Await `work`, cancelling it when the client disconnects first (then HTTP 499, which
    nobody receives: the point is that the request stops)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await request.is_disconnected():
            task.cancel()
    try:
        return task.result()
    except asyncio.CancelledError:
        raise APIError(499, "client closed the request") from None


_ERROR_MEANINGS = {
    400: "invalid request", 401: "missing or wrong API key (when keys are on)",
    404: "unknown model", 413: "request body too large", 429: "an admission limit is reached "
    "(see Retry-After)", 503: "no live worker can serve the request"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERROR_MEANINGS[c]} for c in codes}


_REF = "#/components/schemas/{model}"


def _sse_event(chunk: type) -> dict[str, Any]:
    """The schema of one server-sent event: a JSON chunk (or an error object), or `[DONE]`."""
    payload = {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                         {"$ref": _REF.format(model=ErrorResponse.__name__)}]}
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"anyOf": [{"const": "[DONE]"}, {
            "type": "string", "contentMediaType": "application/json",
            "contentSchema": payload}]}}}


def _generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "the completion; with `stream: true`, "
                  "server-sent events of chunks ending with `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": _sse_event(chunk)}}},
            **_errors(400, 401, 404, 413, 429, 503)}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 answers: validation errors are 400 here."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        for chunk in (CompletionChunk, ChatCompletionChunk):  # referenced by the SSE events
            s = chunk.model_json_schema(ref_template=_REF)
            comps.update(s.pop("$defs", {}))
            comps[chunk.__name__] = s
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(cfg: GatewayConfig) -> FastAPI:
    """The gateway's FastAPI application."""
    gw = Gateway(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        grpc_server = None
        listener = gw.metrics_listener(gw.metrics.registry)
        try:
            if listener is not None:
                await listener.start()
            if cfg.grpc_port:
                from services.gateway.grpc_api import start_grpc_server

                grpc_server = await start_grpc_server(gw, cfg.host, cfg.grpc_port)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2)
            if listener is not None:
                await listener.stop()
            await gw.stop()

    app = FastAPI(title="splitserve gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of a splitserve cluster (docs/grpc.md for "
                  "the gRPC API). Errors are OpenAI error JSON.")
    app.state.gateway = gw
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, admission=gw.admission, api_keys=gw.api_keys,
                       max_body_bytes=cfg.max_body_bytes,
                       slow_client_timeout_s=cfg.slow_client_timeout_s,
                       on_slow_client=gw.metrics.slow_clients_cut.inc,
                       metrics_port=cfg.metrics_port)
    known_paths = GENERATION_PATHS | {"/v1/models", "/health", "/metrics"}

    app.add_middleware(RequestCountMiddleware, metrics=gw.metrics, known_paths=known_paths)

    # outermost: request id, span, access log (and the route headers kept or dropped)
    app.add_middleware(RequestContextMiddleware, route_headers=cfg.route_headers)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": cfg.name, "object": "model", "created": now(), "owned_by": "splitserve",
            "max_model_len": cfg.max_model_len}]}

    @app.get("/health", responses={503: {"description": "no route to a live worker"}})
    async def health() -> JSONResponse:
        d = gw.directory
        counts = {r.value: len(d.by_role(r)) for r in WorkerRole} if d else {}
        for role, n in counts.items():
            gw.metrics.live_workers.labels(role).set(n)
        ok = bool(d and d.routable)
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers": counts},
                            status_code=200 if ok else 503)

    if not cfg.metrics_port:  # else on their own port; this one answers 404 (the guard)
        @app.get("/metrics", response_class=Response, responses={200: {
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text format"}})
        async def metrics() -> Response:
            await gw.refresh_gauges()
            return Response(generate_latest(gw.metrics.registry),
                            media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse,
                                                                    CompletionChunk))
    async def completions(req: CompletionRequest, request: Request):
        p = await gw.prepare(req, "completion")
        return await (gw.stream(p, request) if p.stream else gw.complete(p, request))

    @app.post("/v1/chat/completions", responses=_generation_responses(
        ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        p = await gw.prepare(req, "chat")
        return await (gw.stream(p, request) if p.stream else gw.complete(p, request))

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def serve(cfg: GatewayConfig) -> None:
    """Run the gateway (blocks until SIGINT/SIGTERM)."""
    import uvicorn

    configure_logging(LogConfig(), component="gateway")
    tracing.setup(TracingConfig(), "splitserve-gateway")
    try:
        app = create_app(cfg)
    except (ApiKeyError, ClusterSecretError) as exc:
        raise SystemExit(f"splitserve gateway: {exc}") from None
    keys = app.state.gateway.api_keys
    log.info("API keys: %s", f"on ({len(keys)} accepted)" if keys else
                "off (any client is served; see docs/operations.md)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_keep_alive=30,
                log_config=None)  # uvicorn's records go through services/logs.py
