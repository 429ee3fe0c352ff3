"""OpenAI streaming chunks as server-sent events, built once per request and per token.

Every content chunk of a stream repeats the same id, object, created and model; only the text
and the finish reason change. `ChunkEncoder.content` writes those two into a prefix and suffix
built when the stream starts, instead of building and serializing a dict per token (the
gateway's per-token cost is what a stream pays for the extra hop; docs/benchmarks.md). The
bytes are the same as `ChunkEncoder.event` gives for the same chunk (tests/unit/test_gateway_sse.py).
"""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 kept as is (as the rest of the gateway writes it)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class ChunkEncoder:
    """The SSE events of one streamed completion (chat or legacy completions)."""

    def __init__(self, request_id: str, created: int, model: str, *, chat: bool,
                 include_usage: bool) -> None:
        self.request_id = request_id
        self.created = created
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.object = "chat.completion.chunk" if chat else "text_completion"
        head = dumps({"id": request_id, "object": self.object, "created": created,
                      "model": model})
        self._prefix = f'data: {head[:-1]},"choices":[{{"index":0,'
        self._suffix = ',"usage":null}\n\n' if include_usage else "}\n\n"

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        """Any chunk: the given choices (and usage, when the client asked for it)."""
        body: dict[str, Any] = {"id": self.request_id, "object": self.object,
                                "created": self.created, "model": self.model,
                                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {dumps(body)}\n\n"

    def choice(self, text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
        """One choice of a chunk, in the chat (delta) or completions (text) shape."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def content(self, text: str, finish: str | None) -> str:
        """A chunk carrying generated text and/or a finish reason: the per-token event."""
        if self.chat:
            body = f'"delta":{{"content":{dumps(text)}}}' if text else '"delta":{}'
        else:
            body = f'"text":{dumps(text)}'
        fin = "null" if finish is None else dumps(finish)
        return f'{self._prefix}{body},"logprobs":null,"finish_reason":{fin}}}]{self._suffix}'
