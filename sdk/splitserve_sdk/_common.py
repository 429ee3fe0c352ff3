"""What the sync and asyncio clients share: options, request building, retry timing."""

from __future__ import annotations

import json
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
             stop: str | Sequence[str] | None = None, ignore_eos: bool = False, *,
             top_k: int | None = None, min_p: float | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             repetition_penalty: float | None = None, stop_token_ids: Sequence[int] = (),
             min_tokens: int | None = None, logprobs: int | None = None, n: int | None = None,
             logit_bias: Mapping[int, float] | None = None,
             json_schema: Mapping[str, Any] | str | None = None, json_object: bool = False,
             regex: str | None = None, choice: Sequence[str] | None = None,
             grammar: str | None = None, include_stop_str_in_output: bool = False
             ) -> pb.SamplingParams:
    """The API's SamplingParams; every parameter means what vLLM's OpenAI server means by
    it. `logprobs`: return each token's logprob and this many alternatives. At most one of
    json_schema, json_object, regex, choice, grammar (structured output)."""
    s = pb.SamplingParams(ignore_eos=ignore_eos,
                          include_stop_str_in_output=include_stop_str_in_output)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("seed", seed), ("top_k", top_k), ("min_p", min_p),
                        ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty),
                        ("repetition_penalty", repetition_penalty),
                        ("min_tokens", min_tokens), ("logprobs", logprobs), ("n", n)):
        if value is not None:
            setattr(s, name, value)
    if stop:
        s.stop.extend([stop] if isinstance(stop, str) else list(stop))
    s.stop_token_ids.extend(stop_token_ids)
    for token, bias in (logit_bias or {}).items():
        s.logit_bias[int(token)] = bias
    constraints = [(k, v) for k, v in (("json_schema", json_schema), ("json_object", json_object),
                                       ("regex", regex), ("choice", choice),
                                       ("grammar", grammar)) if v]
    if len(constraints) > 1:
        raise ValueError("at most one structured output: got "
                         + ", ".join(k for k, _ in constraints))
    if constraints:
        kind, value = constraints[0]
        so = s.structured_output
        if kind == "json_schema":
            so.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif kind == "choice":
            so.choice.values.extend(value)
        else:
            setattr(so, kind, value)
    return s


def complete_request(model: str, prompt: str | Sequence[int], **kw: Any) -> pb.CompleteRequest:
    req = pb.CompleteRequest(model=model, sampling=sampling(**kw))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def tool_call(c: Mapping[str, Any] | pb.ToolCall) -> pb.ToolCall:
    """A call as the API's ToolCall: {"id", "name", "arguments"} or OpenAI's shape
    {"id", "function": {"name", "arguments"}} (SDK results' ToolCall too)."""
    if isinstance(c, pb.ToolCall):
        return c
    if not isinstance(c, Mapping):
        return pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
    fn = c.get("function") or c
    args = fn.get("arguments") or ""
    return pb.ToolCall(id=c.get("id") or "", name=fn.get("name") or "",
                       arguments=args if isinstance(args, str) else json.dumps(args))


def chat_message(m: Message) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    if isinstance(m, tuple):
        return pb.ChatMessage(role=m[0], content=m[1])
    return pb.ChatMessage(role=m["role"], content=m.get("content") or "",
                          name=m.get("name") or "", tool_call_id=m.get("tool_call_id") or "",
                          tool_calls=[tool_call(c) for c in m.get("tool_calls") or ()])


def tool(t: Mapping[str, Any] | pb.Tool) -> pb.Tool:
    """A function the model may call: {"name", "description", "parameters": JSON schema} or
    OpenAI's shape {"type": "function", "function": {...}}."""
    if isinstance(t, pb.Tool):
        return t
    fn = t.get("function") or t
    params = fn.get("parameters")
    return pb.Tool(name=fn["name"], description=fn.get("description") or "",
                   parameters_json="" if params is None else (
                       params if isinstance(params, str) else json.dumps(params)))


TOOL_CHOICE_MODES = ("auto", "none", "required")


def tool_choice(choice: str | Mapping[str, Any]) -> pb.ToolChoice:
    """"auto", "none", "required", the name of the one function to call, or OpenAI's shape
    {"type": "function", "function": {"name": ...}}."""
    if isinstance(choice, Mapping):
        return pb.ToolChoice(function=(choice.get("function") or choice)["name"])
    if choice in TOOL_CHOICE_MODES:
        return pb.ToolChoice(mode=choice)
    return pb.ToolChoice(function=choice)


def chat_request(model: str, messages: Iterable[Message],
                 tools: Iterable[Mapping[str, Any] | pb.Tool] = (),
                 tool_choice_: str | Mapping[str, Any] | None = None, **kw: Any
                 ) -> pb.ChatRequest:
    req = pb.ChatRequest(model=model, messages=[chat_message(m) for m in messages],
                         sampling=sampling(**kw), tools=[tool(t) for t in tools])
    if tool_choice_ is not None:
        req.tool_choice.CopyFrom(tool_choice(tool_choice_))
    return req


def retryable(exc: grpc.RpcError) -> bool:
    return getattr(exc, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE
