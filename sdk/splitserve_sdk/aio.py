"""The asyncio client (same API as Client, with coroutines and async iterators)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import grpc

from splitserve_sdk import _common as c
from splitserve_sdk.errors import from_rpc_error
from splitserve_sdk.proto.v1 import inference_pb2 as pb
from splitserve_sdk.proto.v1 import inference_pb2_grpc as pb_grpc
from splitserve_sdk.types import Chunk, Completion, Health, ModelInfo

_UNSET: Any = object()


class AsyncClient:
    """asyncio client of splitserve's gRPC API; options as for `splitserve_sdk.Client`.
    Create it inside the event loop that uses it."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 retries: int = 3, backoff: float = 0.1, max_backoff: float = 2.0,
                 tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, model: str | None = None) -> None:
        self.options = c.Options(target, timeout, retries, backoff, max_backoff, token, tls,
                                 root_certificates)
        creds = self.options.credentials()
        opts = self.options.channel_options()
        self._channel = (grpc.aio.secure_channel(target, creds, options=opts) if creds
                         else grpc.aio.insecure_channel(target, options=opts))
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._model = model

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> c.Deadline:
        return c.Deadline(self.options.timeout if timeout is _UNSET else timeout)

    async def _unary(self, fn: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await fn(request, timeout=deadline.remaining(),
                                metadata=self.options.metadata())
            except grpc.RpcError as exc:
                delay = self.options.retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(exc) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(self, fn: Callable[..., Any], request: Any, timeout: float | None
                      ) -> AsyncIterator[Chunk]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = fn(request, timeout=deadline.remaining(), metadata=self.options.metadata())
            streamed = False
            try:
                async for msg in call:
                    streamed = True
                    yield Chunk.from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = self.options.retry_delay(exc, attempt, deadline, streamed)
                if delay is None:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def _model_name(self, model: str | None) -> str:
        if model:
            return model
        if self._model is None:
            models = await self.models()
            if not models:
                raise ValueError("the gateway lists no models")
            self._model = models[0].id
        return self._model

    async def models(self, *, timeout: float | None = _UNSET) -> list[ModelInfo]:
        resp = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in resp.models]

    async def health(self, *, timeout: float | None = _UNSET) -> Health:
        return Health.from_proto(await self._unary(self._stub.Health, pb.HealthRequest(),
                                                   timeout))

    async def stream_generate(self, prompt: str | Sequence[int], *, model: str | None = None,
                              timeout: float | None = _UNSET, **params: Any
                              ) -> AsyncIterator[Chunk]:
        """Text completion of `prompt` (text or token ids), chunk by chunk; `params` are the
        sampling parameters of `splitserve_sdk.sampling` (max_tokens, temperature, logprobs,
        n, json_schema, regex, ...)."""
        req = c.complete_request(await self._model_name(model), prompt, **params)
        async for chunk in self._stream(self._stub.Complete, req, timeout):
            yield chunk

    async def generate(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        return Completion.from_chunks([ch async for ch in self.stream_generate(prompt, **kw)])

    async def stream_chat(self, messages: Iterable[c.Message], *, model: str | None = None,
                          tools: Iterable[Mapping[str, Any]] = (),
                          tool_choice: str | Mapping[str, Any] | None = None,
                          timeout: float | None = _UNSET, **params: Any
                          ) -> AsyncIterator[Chunk]:
        """Chat completion, chunk by chunk (arguments as Client.stream_chat)."""
        req = c.chat_request(await self._model_name(model), messages, tools, tool_choice,
                             **params)
        async for chunk in self._stream(self._stub.Chat, req, timeout):
            yield chunk

    async def chat(self, messages: Iterable[c.Message], **kw: Any) -> Completion:
        return Completion.from_chunks([ch async for ch in self.stream_chat(messages, **kw)])
