"""The per-token SSE fast path writes exactly the bytes of the general chunk builder."""

from __future__ import annotations

import json

import pytest

from services.gateway.sse import DONE, ChunkEncoder

TEXTS = ["", "a", " hello", 'quote " and \\ backslash', "line\nbreak\ttab", "\x00\x1f ctrl",
         "é 🙂 日本 €", "\u2028\u2029", "</script>", "{}[],:"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("finish", [None, "stop", "length", "abort"])
def test_content_chunk_is_byte_identical_to_the_general_builder(chat: bool, include_usage: bool,
                                                                 finish: str | None) -> None:
    enc = ChunkEncoder('cmpl-"x"', 1_700_000_000, "model/é", chat=chat,
                       include_usage=include_usage)
    for text in TEXTS:
        fast = enc.content(text, finish)
        assert fast == enc.event([enc.choice(text, finish)]), (text, finish)
        assert fast.startswith("data: ") and fast.endswith("\n\n")
        body = json.loads(fast[len("data: "):])
        assert body["id"] == 'cmpl-"x"' and body["model"] == "model/é"
        assert body["object"] == ("chat.completion.chunk" if chat else "text_completion")
        choice = body["choices"][0]
        assert choice["finish_reason"] == finish
        got = choice["delta"].get("content", "") if chat else choice["text"]
        assert got == text
        assert ("usage" in body) is include_usage and body.get("usage") is None


def test_role_and_usage_chunks() -> None:
    enc = ChunkEncoder("r1", 5, "m", chat=True, include_usage=True)
    first = json.loads(enc.event([enc.choice("", None, role=True)])[6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    last = json.loads(enc.event([], usage)[6:])
    assert last["choices"] == [] and last["usage"] == usage
    assert DONE == "data: [DONE]\n\n"
