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
class Chunk:
    """One streamed piece of output; the last one has finish_reason and usage."""

    id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None

    @classmethod
    def from_proto(cls, c: pb.CompletionChunk) -> "Chunk":
        return cls(id=c.id, token_ids=tuple(c.token_ids), text=c.text,
                   finish_reason=c.finish_reason or None,
                   usage=Usage.from_proto(c.usage) if c.HasField("usage") else None)


@dataclass(frozen=True)
class Completion:
    """A whole result: the chunks of one call put together."""

    id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None

    @classmethod
    def from_chunks(cls, chunks: "list[Chunk]") -> "Completion":
        finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), None)
        usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
        return cls(id=chunks[0].id if chunks else "", text="".join(c.text for c in chunks),
                   token_ids=tuple(t for c in chunks for t in c.token_ids),
                   finish_reason=finish, usage=usage)


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
