"""The public gRPC API (`splitserve.v1.Inference`) served by vLLM's own serving layer: the
gateway's vLLM front end (services/gateway/vllm_frontend.py) answers Complete and Chat with the
same `OpenAIServingCompletion` / `OpenAIServingChat` objects its HTTP endpoints use, so a gRPC
request is validated, templated, constrained (structured output), tool-parsed and sampled
exactly as the same request over HTTP.

A call becomes the HTTP endpoint's request body (services/gateway/grpc_mapping.py), always
streamed, with usage and token ids; it is validated by vLLM's request model and served; each
streamed OpenAI chunk becomes one CompletionChunk per choice. Errors are vLLM's own, by their
HTTP status (see `grpc_api.status_for`): a validation error is INVALID_ARGUMENT with vLLM's
message, no live worker UNAVAILABLE (nothing streamed: safe to retry). Cancelling the call
closes vLLM's stream, which aborts the request on every worker it reached.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import grpc
from pydantic import ValidationError

from services.gateway.errors import APIError, _validation_error
from services.gateway.grpc_api import InferenceServicer, status_for
from services.gateway.grpc_mapping import MappingError, chat_body, chunks, completion_body
from services.gateway.http_guard import NO_WORKERS
from services.gateway.metrics import StreamTimer
from services.gateway.tenancy import current_tenant
from splitserve_sdk.proto.v1 import inference_pb2 as ipb

if TYPE_CHECKING:
    from services.gateway.app import Gateway

log = logging.getLogger(__name__)


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


class ServingInference(InferenceServicer):
    """splitserve.v1.Inference over the vLLM front end's serving objects (`state`: the app
    state vLLM's `init_app_state` filled)."""

    def __init__(self, gw: "Gateway", state: Any) -> None:
        super().__init__(gw)
        self.state = state

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
        start = time.perf_counter()
        gw.metrics.in_flight.inc()
        try:
            async for chunk in self._stream(body, model, handler, route, start):
                yield chunk
            gw.metrics.e2e.labels(route).observe(time.perf_counter() - start)
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
                      handler: Callable[..., Any], route: str, start: float
                      ) -> AsyncIterator[ipb.CompletionChunk]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        flow = self.gw.flow
        if flow is None or not await flow.can_route():  # as the HTTP guard decides
            raise _refused(503, NO_WORKERS.message)
        try:
            request = model.model_validate(body())
        except MappingError as exc:
            raise _refused(400, str(exc)) from None
        except ValidationError as exc:
            from fastapi.exceptions import RequestValidationError

            raise _refused(400, _validation_error(RequestValidationError(exc.errors())).message
                           ) from None
        except Exception as exc:  # vLLM's own checks in its model's validators
            raise _vllm_refusal(exc) from None
        try:
            result = await handler(request, None)
        except Exception as exc:
            raise _vllm_refusal(exc) from None
        if isinstance(result, ErrorResponse):
            raise _refused(result.error.code, result.error.message)
        timer = StreamTimer(self.gw.metrics, route, start)
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
                        timer.chunk(bool(out.token_ids))
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
