"""The synchronous client."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import grpc

from splitserve_sdk import _common as c
from splitserve_sdk.errors import from_rpc_error
from splitserve_sdk.proto.v1 import inference_pb2 as pb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as pb_grpc
from splitserve_sdk.types import Chunk, Completion, Health, ModelInfo

T = TypeVar("T")
_UNSET: Any = object()


class Client:
    """Blocking client of splitserve's gRPC API (`splitserve.v1.Inference`).

    target:       "host:port" of a gateway's gRPC port (`splitserve up --grpc-port`, 50051).
    timeout:      default deadline of every call in seconds (None: no deadline); each method
                  takes its own `timeout=` too. The deadline covers all retries of a call.
    retries:      retries of a call that failed with UNAVAILABLE before anything was streamed
                  (gateway not up yet, no live worker); exponential backoff starting at
                  `backoff` seconds, at most `max_backoff`, with jitter.
    tls:          connect with TLS (system roots, or `root_certificates` PEM bytes).
    token:        sent as `authorization: Bearer <token>` metadata on every call.
    model:        default model; None: the first one the gateway lists.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 retries: int = 3, backoff: float = 0.1, max_backoff: float = 2.0,
                 tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, model: str | None = None) -> None:
        self.options = c.Options(target, timeout, retries, backoff, max_backoff, token, tls,
                                 root_certificates)
        creds = self.options.credentials()
        opts = self.options.channel_options()
        self._channel = (grpc.secure_channel(target, creds, options=opts) if creds
                         else grpc.insecure_channel(target, options=opts))
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._model = model

    # --- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> c.Deadline:
        return c.Deadline(self.options.timeout if timeout is _UNSET else timeout)

    def _unary(self, fn: Callable[..., T], request: Any, timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return fn(request, timeout=deadline.remaining(),
                          metadata=self.options.metadata())
            except grpc.RpcError as exc:
                delay = self.options.retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(exc) from None
            time.sleep(delay)
            attempt += 1

    def _stream(self, fn: Callable[..., Any], request: Any, timeout: float | None
                ) -> Iterator[Chunk]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = fn(request, timeout=deadline.remaining(), metadata=self.options.metadata())
            streamed = False
            try:
                for msg in call:
                    streamed = True
                    yield Chunk.from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = self.options.retry_delay(exc, attempt, deadline, streamed)
                if delay is None:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()  # no-op when finished; aborts the request when abandoned
            time.sleep(delay)
            attempt += 1

    def _model_name(self, model: str | None) -> str:
        if model:
            return model
        if self._model is None:
            models = self.models()
            if not models:
                raise ValueError("the gateway lists no models")
            self._model = models[0].id
        return self._model

    # --- API ---------------------------------------------------------------------------------
    def models(self, *, timeout: float | None = _UNSET) -> list[ModelInfo]:
        resp = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in resp.models]

    def health(self, *, timeout: float | None = _UNSET) -> Health:
        return Health.from_proto(self._unary(self._stub.Health, pb.HealthRequest(), timeout))

    def stream_generate(self, prompt: str | Sequence[int], *, model: str | None = None,
                        timeout: float | None = _UNSET, **params: Any) -> Iterator[Chunk]:
        """Text completion of `prompt` (text or token ids), chunk by chunk; `params` are the
        sampling parameters of `splitserve_sdk.sampling` (max_tokens, temperature, logprobs,
        n, json_schema, regex, ...). Closing the iterator early cancels the call (and the
        request on the workers)."""
        req = c.complete_request(self._model_name(model), prompt, **params)
        return self._stream(self._stub.Complete, req, timeout)

    def generate(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        """Text completion, whole (same arguments as stream_generate)."""
        return Completion.from_chunks(list(self.stream_generate(prompt, **kw)))

    def stream_chat(self, messages: Iterable[c.Message], *, model: str | None = None,
                    tools: Iterable[Mapping[str, Any]] = (),
                    tool_choice: str | Mapping[str, Any] | None = None,
                    timeout: float | None = _UNSET, **params: Any) -> Iterator[Chunk]:
        """Chat completion, chunk by chunk. `messages`: dicts {"role", "content"[, "name",
        "tool_calls", "tool_call_id"]} or (role, content) tuples; `tools`: functions the
        model may call ({"name", "description", "parameters"} or OpenAI's shape);
        `tool_choice`: "auto", "none", "required" or a function's name; `params`: sampling
        parameters, as for stream_generate."""
        req = c.chat_request(self._model_name(model), messages, tools, tool_choice, **params)
        return self._stream(self._stub.Chat, req, timeout)

    def chat(self, messages: Iterable[c.Message], **kw: Any) -> Completion:
        """Chat completion, whole (same arguments as stream_chat)."""
        return Completion.from_chunks(list(self.stream_chat(messages, **kw)))
