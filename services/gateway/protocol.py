"""OpenAI-compatible request and response models (the subset splitserve serves)."""

from __future__ import annotations

import functools
import re
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# JSON may escape UTF-16 surrogates (`"\ud800"`); unpaired, they are not text: the tokenizer
# cannot encode them, and nothing downstream should see them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The path of the first string inside `value` holding an unpaired surrogate, if any."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return f"{path}.{key!r}".lstrip(".")
        if (found := lone_surrogate_at(item, f"{path}.{key}".lstrip("."))) is not None:
            return found
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""  # which vLLM request model: "chat" or "completion"

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    # splitserve extension: keep generating past EOS (fixed output lengths for benchmarks)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if (where := lone_surrogate_at(data)) is not None:
            raise ValueError(f"invalid Unicode: an unpaired surrogate in `{where or 'body'}`")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        """A list; its length and sizes are bounded by the gateway's settings."""
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    def unsupported(self) -> str | None:
        """Name of a requested vLLM parameter this gateway does not honour, if any: any field
        of vLLM's own request model given a value other than vLLM's default (or one that
        means the same). Fields vLLM does not know either are ignored, as vLLM ignores them."""
        if self.n != 1:
            return "n"
        defaults = vllm_request_defaults(self.kind)
        for name, value in (self.model_extra or {}).items():
            if name in defaults and not _neutral(name, value, defaults[name]):
                return name
        return None


# Values that mean what vLLM's default means (vLLM's default is often None: "not given").
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,),
    "top_k": (0, -1), "min_p": (0,), "stop_token_ids": ([],), "logit_bias": ({},),
    "tools": ([],), "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"),
    "bad_words": ([],), "allowed_token_ids": (None,), "echo": (False,),
    "include_stop_str_in_output": (False,), "min_tokens": (0,), "length_penalty": (1,),
    "use_beam_search": (False,), "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,), "priority": (0,),
}


def _neutral(name: str, value: Any, default: Any) -> bool:
    if value is None or value == default:
        return True
    return any(value == v and type(value) is not bool or value is v
               for v in _NEUTRAL.get(name, ()))


@functools.lru_cache(maxsize=2)
def vllm_request_defaults(kind: str) -> dict[str, Any]:
    """{field: default} of vLLM's own request model for `chat` or `completion` (the pinned
    vLLM's; imported on first use: Gateway.start warms it)."""
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VllmRequest)
    else:
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionRequest as VllmRequest)
    out = {}
    for name, field in VllmRequest.model_fields.items():
        if name in HONOURED:
            continue
        out[name] = field.default_factory() if field.default_factory is not None else (
            field.default)
    return out


HONOURED = frozenset({"model", "prompt", "messages", "max_tokens", "max_completion_tokens",
                      "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
                      "user", "ignore_eos"})
"""vLLM request fields the gateway honours itself (the rest: vLLM's default or refused)."""


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    kind: ClassVar[str] = "completion"

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text content parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    kind: ClassVar[str] = "chat"

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


# --- responses (as documented in the OpenAPI schema) -----------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the HTTP API."""

    error: ErrorDetail


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    """POST /v1/completions without `stream` (with it: `text/event-stream` chunks)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    """POST /v1/chat/completions without `stream` (with it: `text/event-stream` chunks)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed /v1/completions."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed /v1/chat/completions."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
