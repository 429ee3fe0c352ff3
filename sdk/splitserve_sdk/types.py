"""Typed results of the splitserve API (plain dataclasses, no protobuf in sight)."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve_sdk.proto.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @classmethod
    def from_proto(cls, u: pb.Usage) -> "Usage":
        return cls(u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob, and the most likely alternatives at its position
    (token, logprob), most likely first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_proto(cls, t: pb.TokenLogprob) -> "TokenLogprob":
        return cls(t.token, t.logprob, tuple((a.token, a.logprob) for a in t.top))


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call, as streamed: the first piece of a call has its id and name,
    the rest more of its JSON arguments."""

    index: int
    id: str
    name: str
    arguments: str

    @classmethod
    def from_proto(cls, d: pb.ToolCallDelta) -> "ToolCallDelta":
        return cls(d.index, d.id, d.name, d.arguments)


@dataclass(frozen=True)
class ToolCall:
    """A whole tool call: the function's name and its arguments (JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of output of choice `index`; a choice's last chunk has its
    finish_reason, the call's last one usage."""

    id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()
    reasoning: str = ""

    @classmethod
    def from_proto(cls, c: pb.CompletionChunk) -> "Chunk":
        return cls(id=c.id, token_ids=tuple(c.token_ids), text=c.text,
                   finish_reason=c.finish_reason or None,
                   usage=Usage.from_proto(c.usage) if c.HasField("usage") else None,
                   index=c.index, logprobs=tuple(TokenLogprob.from_proto(t) for t in c.logprobs),
                   tool_calls=tuple(ToolCallDelta.from_proto(d) for d in c.tool_calls),
                   reasoning=c.reasoning)


@dataclass(frozen=True)
class Choice:
    """One of a request's `n` outputs, whole."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""

    @classmethod
    def from_chunks(cls, index: int, chunks: "list[Chunk]") -> "Choice":
        calls: dict[int, list[str]] = {}  # call index -> [id, name, arguments]
        for c in chunks:
            for d in c.tool_calls:
                call = calls.setdefault(d.index, ["", "", ""])
                call[0] = call[0] or d.id
                call[1] = call[1] or d.name
                call[2] += d.arguments
        return cls(index=index, text="".join(c.text for c in chunks),
                   token_ids=tuple(t for c in chunks for t in c.token_ids),
                   finish_reason=next((c.finish_reason for c in reversed(chunks)
                                       if c.finish_reason), None),
                   logprobs=tuple(t for c in chunks for t in c.logprobs),
                   tool_calls=tuple(ToolCall(*calls[i]) for i in sorted(calls)),
                   reasoning="".join(c.reasoning for c in chunks))


@dataclass(frozen=True)
class Completion:
    """A whole result: the chunks of one call put together, by choice. `text`, `token_ids`,
    `finish_reason`, `logprobs`, `tool_calls` and `reasoning` are the first choice's."""

    id: str
    choices: tuple[Choice, ...]
    usage: Usage | None

    @classmethod
    def from_chunks(cls, chunks: "list[Chunk]") -> "Completion":
        by_index: dict[int, list[Chunk]] = {}
        for c in chunks:
            by_index.setdefault(c.index, []).append(c)
        usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
        choices = tuple(Choice.from_chunks(i, by_index[i]) for i in sorted(by_index))
        return cls(id=chunks[0].id if chunks else "",
                   choices=choices or (Choice(0, "", (), None),), usage=usage)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...]:
        return self.choices[0].logprobs

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.choices[0].tool_calls

    @property
    def reasoning(self) -> str:
        return self.choices[0].reasoning


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
    owned_by: str

    @classmethod
    def from_proto(cls, m: pb.Model) -> "ModelInfo":
        return cls(m.id, m.max_model_len, m.owned_by)


@dataclass(frozen=True)
class Health:
    """The gateway's view: can it serve, and with which live workers (by role)."""

    serving: bool
    status: str  # SERVING, NOT_SERVING
    workers: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, h: pb.HealthResponse) -> "Health":
        return cls(serving=h.status == pb.HealthResponse.SERVING,
                   status=pb.HealthResponse.Status.Name(h.status), workers=dict(h.workers))
