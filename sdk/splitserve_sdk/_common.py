"""What the sync and asyncio clients share: options, request building, retry timing."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

import grpc

from splitserve_sdk.proto.v1 import inference_pb2 as pb

Message = Union[Mapping[str, Any], tuple[str, str], pb.ChatMessage]


@dataclass
class Options:
    """Connection options of a client (see Client for their meaning)."""

    target: str
    timeout: float | None = None
    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None

    def channel_options(self) -> list[tuple[str, Any]]:
        ms = int(self.backoff * 1000) or 1
        return [("grpc.initial_reconnect_backoff_ms", ms),
                ("grpc.min_reconnect_backoff_ms", ms),
                ("grpc.max_reconnect_backoff_ms", max(ms, int(self.max_backoff * 1000))),
                ("grpc.enable_retries", 0)]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates):
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter before retry number `attempt` (0-based)."""
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base * (0.5 + random.random() / 2)

    def retry_delay(self, exc: grpc.RpcError, attempt: int, deadline: "Deadline",
                    streamed: bool = False) -> float | None:
        """How long to wait before retrying a failed call, or None to give up: only UNAVAILABLE
        is retried, only while nothing has streamed, retries are left and the deadline allows
        the wait."""
        delay = self.delay(attempt)
        if streamed or not (retryable(exc) and attempt < self.retries and deadline.allows(delay)):
            return None
        return delay


class Deadline:
    """One call's deadline, across its retries."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def allows(self, delay: float) -> bool:
        return self.at is None or time.monotonic() + delay < self.at


def sampling(max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, ignore_eos: bool = False
             ) -> pb.SamplingParams:
    s = pb.SamplingParams(ignore_eos=ignore_eos)
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if temperature is not None:
        s.temperature = temperature
    if top_p is not None:
        s.top_p = top_p
    if seed is not None:
        s.seed = seed
    if stop:
        s.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return s


def complete_request(model: str, prompt: str | Sequence[int], **kw: Any) -> pb.CompleteRequest:
    req = pb.CompleteRequest(model=model, sampling=sampling(**kw))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def chat_message(m: Message) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    if isinstance(m, tuple):
        return pb.ChatMessage(role=m[0], content=m[1])
    return pb.ChatMessage(role=m["role"], content=m.get("content") or "",
                          name=m.get("name") or "")


def chat_request(model: str, messages: Iterable[Message], **kw: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[chat_message(m) for m in messages],
                          sampling=sampling(**kw))


def retryable(exc: grpc.RpcError) -> bool:
    return getattr(exc, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE
