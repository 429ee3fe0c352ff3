"""The public gRPC API (`splitserve.v1.Inference`, proto/splitserve/v1/inference.proto), served
by the gateway process next to its HTTP app, through the same pipeline. This is the splitserve
front end's servicer; the vLLM front end's (services/gateway/grpc_serving.py) serves every
field of the API through vLLM's serving layer, while this one refuses what its pipeline does
not serve (INVALID_ARGUMENT naming the field and the front end that serves it).

A request is turned into the HTTP endpoint's pydantic model first, so validation (and every
error message) is the HTTP endpoint's; then `Gateway.prepare()` and `PDFlow.stream()` run as
for HTTP. Errors map to status codes:

    APIError 400 / pydantic validation / worker INVALID_ARGUMENT  -> INVALID_ARGUMENT
    APIError 404 (unknown model)                                  -> NOT_FOUND
    missing or wrong API key (HTTP 401; Health stays open)        -> UNAUTHENTICATED
    admission limits (HTTP 429), message over max_body_bytes      -> RESOURCE_EXHAUSTED
    APIError 503 / WorkerUnavailable                              -> UNAVAILABLE
    the call's deadline                                           -> DEADLINE_EXCEEDED

When the client cancels (or its deadline passes), grpc.aio cancels the handler; the
cancellation unwinds `PDFlow.stream()`, which aborts the request on every worker it reached.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import grpc
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from services.gateway.errors import APIError, _validation_error
from services.gateway.metrics import StreamTimer
from services.gateway.pd_flow import GenerationResult, WorkerUnavailable
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.grpc_context import ServerContextInterceptor
from services.grpc_options import server_options
from router.registry import WorkerRole
from splitserve_sdk.proto.v1 import inference_pb2 as ipb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as ipb_grpc

if TYPE_CHECKING:
    from services.gateway.app import Gateway

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


def _sampling_fields(s: ipb.SamplingParams) -> dict[str, Any]:
    """The proto's sampling parameters as the OpenAI request's fields (unset: defaults)."""
    out: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if s.HasField(name):
            out[name] = getattr(s, name)
    if s.stop:
        out["stop"] = list(s.stop)
    if s.ignore_eos:
        out["ignore_eos"] = True
    return out


# what this front end's pipeline serves of the API's messages; any other field set is refused
_SERVED_SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos"})
_SERVED_MESSAGE = frozenset({"role", "content", "name"})
_SERVED_CHAT = frozenset({"model", "messages", "sampling"})


def _unserved(fields: Any, served: frozenset[str], where: str) -> None:
    for field, _ in fields:
        if field.name not in served:
            raise APIError(400, f"{where}{field.name} is served by the gateway's vLLM front end "
                           "only (frontend: vllm); this gateway runs the splitserve front end",
                           param=f"{where}{field.name}")


def completion_request(req: ipb.CompleteRequest) -> CompletionRequest:
    """The HTTP endpoint's model of a Complete call (raises APIError 400 when invalid)."""
    _unserved(req.sampling.ListFields(), _SERVED_SAMPLING, "sampling.")
    body: dict[str, Any] = {"model": req.model, **_sampling_fields(req.sampling)}
    which = req.WhichOneof("prompt")
    if which == "text":
        body["prompt"] = req.text
    elif which == "token_ids":
        body["prompt"] = list(req.token_ids.ids)
    return _validate(CompletionRequest, body)


def chat_request(req: ipb.ChatRequest) -> ChatCompletionRequest:
    """The HTTP endpoint's model of a Chat call (raises APIError 400 when invalid)."""
    _unserved(req.ListFields(), _SERVED_CHAT, "")
    _unserved(req.sampling.ListFields(), _SERVED_SAMPLING, "sampling.")
    messages = []
    for i, m in enumerate(req.messages):
        _unserved(m.ListFields(), _SERVED_MESSAGE, f"messages[{i}].")
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    body = {"model": req.model, "messages": messages, **_sampling_fields(req.sampling)}
    return _validate(ChatCompletionRequest, body)


def _validate(model: Any, body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(RequestValidationError(exc.errors())) from None


def peer_address(peer: str) -> str:
    """The remote address of a grpc peer string ("ipv4:1.2.3.4:5678" -> "1.2.3.4")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


class InferenceServicer(ipb_grpc.InferenceServicer):
    """splitserve.v1.Inference on top of one Gateway."""

    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw

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
        async for chunk in self._generate(lambda: completion_request(request), "completion",
                                          context):
            yield chunk

    async def Chat(self, request: ipb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[ipb.CompletionChunk]:
        async for chunk in self._generate(lambda: chat_request(request), "chat", context):
            yield chunk

    async def _generate(self, build: Any, kind: str, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[ipb.CompletionChunk]:
        gw = self.gw
        admission = gw.admission
        client = await self._client(context)
        if (refusal := admission.admit(client)) is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message)
        route = f"grpc:{'Chat' if kind == 'chat' else 'Complete'}"
        status = "OK"
        gw.metrics.in_flight.inc()
        try:
            error: tuple[grpc.StatusCode, str] | None = None
            try:
                prepared = await gw.prepare(build(), kind)  # type: ignore[arg-type]
            except APIError as exc:
                error = (status_for(exc), exc.message)
            if error is not None:
                status = error[0].name
                await context.abort(*error)
            assert gw.flow is not None
            result = GenerationResult()
            start = prepared.received_at
            chunks = gw.flow.stream(prepared.request_id, prepared.token_ids, prepared.sampling,
                                    result)
            timer = StreamTimer(gw.metrics, route, start)
            finished = False
            try:
                async for c in chunks:
                    timer.chunk(bool(c.token_ids))
                    out = ipb.CompletionChunk(id=prepared.request_id, token_ids=c.token_ids,
                                              text=c.text)
                    if c.finish_reason:
                        out.finish_reason = c.finish_reason
                        out.usage.CopyFrom(self._usage(result))
                        finished = True
                    yield out
                if not finished:
                    yield ipb.CompletionChunk(id=prepared.request_id,
                                              finish_reason=result.finish_reason or "stop",
                                              usage=self._usage(result))
            except WorkerUnavailable as exc:
                error = (grpc.StatusCode.UNAVAILABLE, str(exc))
            except ValueError as exc:
                error = (grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            finally:
                await chunks.aclose()
            if error is not None:
                status = error[0].name
                await context.abort(*error)
            gw.metrics.e2e.labels(route).observe(time.perf_counter() - start)
            gw._record(route, result)
        except BaseException as exc:
            if status == "OK":
                status = type(exc).__name__
            raise
        finally:
            admission.release(client)
            gw.metrics.in_flight.dec()
            gw.metrics.requests.labels(route, status).inc()

    @staticmethod
    def _usage(r: GenerationResult) -> ipb.Usage:
        return ipb.Usage(prompt_tokens=r.num_prompt_tokens, completion_tokens=r.completion_tokens,
                         total_tokens=r.num_prompt_tokens + r.completion_tokens,
                         cached_tokens=r.num_cached_tokens)

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
        ok = bool(d and d.routable)
        return ipb.HealthResponse(
            status=ipb.HealthResponse.SERVING if ok else ipb.HealthResponse.NOT_SERVING,
            workers=counts)


async def start_grpc_server(gw: "Gateway", host: str, port: int,
                            servicer: InferenceServicer | None = None) -> grpc.aio.Server:
    """Serve splitserve.v1.Inference for `gw` on host:port (started; stop it when done), by
    `servicer` (default: this front end's)."""
    limit = gw.cfg.max_body_bytes
    server = grpc.aio.server(interceptors=[ServerContextInterceptor(public=True)],
                             options=server_options(limit))
    ipb_grpc.add_InferenceServicer_to_server(servicer or InferenceServicer(gw), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind the gRPC API to {address}")
    await server.start()
    log.info("gRPC API (splitserve.v1.Inference) on %s", address)
    return server
