"""The public gRPC API (`splitserve.v1.Inference`, proto/splitserve/v1/inference.proto), served
by the gateway process next to its HTTP API, by vLLM's own serving layer: Complete and Chat
are answered by the same `OpenAIServingCompletion` / `OpenAIServingChat` objects the HTTP
endpoints use (services/gateway/vllm_frontend.py), so a gRPC request is validated, templated,
constrained (structured output), tool-parsed and sampled exactly as the same request over HTTP.

A call becomes the HTTP endpoint's request body (services/gateway/grpc_mapping.py), always
streamed, with usage and token ids; it is validated by vLLM's request model and served; each
streamed OpenAI chunk becomes one CompletionChunk per choice. Errors map to status codes:

    vLLM's validation errors, HTTP 400                      -> INVALID_ARGUMENT (vLLM's message)
    unknown model (404)                                     -> NOT_FOUND
    missing or wrong API key (HTTP 401; Health stays open)  -> UNAUTHENTICATED
    admission limits (HTTP 429), message over max_body_bytes -> RESOURCE_EXHAUSTED
    no live worker (503; nothing streamed: safe to retry)   -> UNAVAILABLE
    the call's deadline                                     -> DEADLINE_EXCEEDED

Cancelling the call closes vLLM's stream, which aborts the request on every worker it reached.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import grpc
from pydantic import ValidationError

from router.registry import WorkerRole
from services.gateway.errors import APIError, validation_error
from services.gateway.grpc_mapping import MappingError, chat_body, chunks, completion_body
from services.gateway.http_guard import NO_WORKERS
from services.gateway.tenancy import current_tenant
from services.grpc_context import ServerContextInterceptor
from services.grpc_options import server_options
from splitserve_sdk.proto.v1 import inference_pb2 as ipb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as ipb_grpc

if TYPE_CHECKING:
    from services.gateway.gateway import Gateway

log = logging.getLogger(__name__)

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
           429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
           504: grpc.StatusCode.DEADLINE_EXCEEDED}


def status_for(err: APIError) -> grpc.StatusCode:
    """The gRPC status of an HTTP API error."""
    if err.status in _STATUS:
        return _STATUS[err.status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= err.status < 500 else (
        grpc.StatusCode.INTERNAL)


def peer_address(peer: str) -> str:
    """The remote address of a grpc peer string ("ipv4:1.2.3.4:5678" -> "1.2.3.4")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


class Refused(Exception):
    """A call ends with this status before anything streamed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refused(status: int, message: str) -> Refused:
    return Refused(status_for(APIError(status, message)), message)


def _vllm_refusal(exc: Exception) -> Refused:
    """vLLM's error response for an exception its serving layer raised, as a refusal."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err = create_error_response(exc).error
    return _refused(err.code, err.message)


def _has_content(c: ipb.CompletionChunk) -> bool:
    return bool(c.text or c.token_ids or c.tool_calls or c.logprobs or c.reasoning
                or c.finish_reason or c.HasField("usage"))


class InferenceServicer(ipb_grpc.InferenceServicer):
    """splitserve.v1.Inference over one gateway and its vLLM front end's serving objects
    (`state`: the app state vLLM's `init_app_state` filled)."""

    def __init__(self, gw: "Gateway", state: Any) -> None:
        self.gw = gw
        self.state = state

    async def _client(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's name for per-client limits: its API key's digest when keys are on
        (aborting with UNAUTHENTICATED when missing or wrong), else its remote address."""
        keys = self.gw.api_keys
        if keys is None:
            return peer_address(context.peer() or "")
        metadata = dict(context.invocation_metadata() or ())
        try:
            return keys.client_of(metadata.get("authorization"))
        except APIError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
            raise  # abort raises; this only tells type checkers

    async def Complete(self, request: ipb.CompleteRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[ipb.CompletionChunk]:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        serving = self.state.openai_serving_completion
        async for chunk in self._serve(lambda: completion_body(request), CompletionRequest,
                                       serving.create_completion, "grpc:Complete", context):
            yield chunk

    async def Chat(self, request: ipb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[ipb.CompletionChunk]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        serving = self.state.openai_serving_chat
        async for chunk in self._serve(lambda: chat_body(request), ChatCompletionRequest,
                                       serving.create_chat_completion, "grpc:Chat", context):
            yield chunk

    async def _serve(self, body: Callable[[], dict[str, Any]], model: Any,
                     handler: Callable[..., Any], route: str,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.CompletionChunk]:
        gw = self.gw
        client = await self._client(context)
        if (refusal := gw.admission.admit(client)) is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message)
        keys = gw.api_keys
        if keys is not None and gw.cfg.tenant_isolation:  # read where it reaches the engines
            current_tenant.set(keys.tenant_of(client))
        status = "OK"
        gw.metrics.in_flight.inc()
        try:
            async for chunk in self._stream(body, model, handler):
                yield chunk
        except Refused as exc:
            status = exc.code.name
            await context.abort(exc.code, exc.message)
        except BaseException as exc:
            status = type(exc).__name__
            raise
        finally:
            gw.admission.release(client)
            gw.metrics.in_flight.dec()
            gw.metrics.requests.labels(route, status).inc()

    async def _stream(self, body: Callable[[], dict[str, Any]], model: Any,
                      handler: Callable[..., Any]) -> AsyncIterator[ipb.CompletionChunk]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if not await self.gw.can_route():  # as the HTTP guard decides
            raise _refused(503, NO_WORKERS.message)
        try:
            request = model.model_validate(body())
        except MappingError as exc:
            raise _refused(400, str(exc)) from None
        except ValidationError as exc:
            from fastapi.exceptions import RequestValidationError

            raise _refused(400, validation_error(RequestValidationError(exc.errors())).message
                           ) from None
        except Exception as exc:  # vLLM's own checks in its model's validators
            raise _vllm_refusal(exc) from None
        try:
            result = await handler(request, None)
        except Exception as exc:
            raise _vllm_refusal(exc) from None
        if isinstance(result, ErrorResponse):
            raise _refused(result.error.code, result.error.message)
        request_id = ""
        held: ipb.CompletionChunk | None = None  # a choice's last chunk, waiting for usage
        try:
            async for sse in result:
                for line in sse.splitlines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]
                        raise _refused(int(err.get("code") or 500), err.get("message") or "")
                    request_id = event.get("id") or request_id
                    for out in chunks(event, request_id):
                        if out.HasField("usage") and not out.text and held is not None:
                            held.usage.CopyFrom(out.usage)
                            continue
                        if not _has_content(out):
                            continue
                        if held is not None:
                            yield held
                            held = None
                        if out.finish_reason:
                            held = out
                        else:
                            yield out
            if held is not None:
                yield held
        finally:
            await result.aclose()

    async def ListModels(self, request: ipb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> ipb.ListModelsResponse:
        await self._client(context)
        cfg = self.gw.cfg
        return ipb.ListModelsResponse(models=[ipb.Model(
            id=cfg.name, max_model_len=cfg.max_model_len, owned_by="splitserve")])

    async def Health(self, request: ipb.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> ipb.HealthResponse:
        d = self.gw.directory
        counts = {r.value: len(d.by_role(r)) for r in WorkerRole} if d else {}
        ok = self.gw.serving  # as the HTTP /health answers
        return ipb.HealthResponse(
            status=ipb.HealthResponse.SERVING if ok else ipb.HealthResponse.NOT_SERVING,
            workers=counts)


async def start_grpc_server(gw: "Gateway", state: Any, host: str, port: int
                            ) -> grpc.aio.Server:
    """Serve splitserve.v1.Inference for `gw` on host:port (started; stop it when done)."""
    limit = gw.cfg.max_body_bytes
    server = grpc.aio.server(interceptors=[ServerContextInterceptor(public=True)],
                             options=server_options(limit))
    ipb_grpc.add_InferenceServicer_to_server(InferenceServicer(gw, state), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind the gRPC API to {address}")
    await server.start()
    log.info("gRPC API (splitserve.v1.Inference) on %s", address)
    return server
