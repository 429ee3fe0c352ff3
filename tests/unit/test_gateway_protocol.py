"""OpenAI request models: what is accepted, what is refused and how."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.protocol import ChatCompletionRequest, CompletionRequest


def test_completion_defaults_follow_openai() -> None:
    r = CompletionRequest(model="m", prompt="hi")
    assert r.max_tokens == 16 and r.temperature == 1.0 and r.top_p == 1.0 and r.stop == []
    assert r.unsupported() is None


def test_stop_is_normalised() -> None:
    # (the number and length of stop sequences are the gateway's settings: test_gateway_guard)
    assert CompletionRequest(model="m", prompt="x", stop="END").stop == ["END"]
    with pytest.raises(ValidationError, match="empty"):
        CompletionRequest(model="m", prompt="x", stop=[""])


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -0.1),
                                         ("temperature", 2.5), ("top_p", 0), ("n", 0)])
def test_out_of_range_values(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", **{field: value})


def test_unsupported_features_are_named() -> None:
    assert CompletionRequest(model="m", prompt="x", n=2).unsupported() == "n"
    assert CompletionRequest(model="m", prompt="x", logprobs=3).unsupported() == "logprobs"
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                 tools=[{"type": "function"}])
    assert chat.unsupported() == "tools"
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                  response_format={"type": "text"}, logprobs=False)
    assert plain.unsupported() is None


def test_chat_messages() -> None:
    with pytest.raises(ValidationError, match="at least one message"):
        ChatCompletionRequest(model="m", messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "wizard", "content": "x"}])
    r = ChatCompletionRequest(model="m", max_completion_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert r.messages[0].text() == "ab" and r.token_limit == 5
    img = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="only text"):
        img.messages[0].text()
