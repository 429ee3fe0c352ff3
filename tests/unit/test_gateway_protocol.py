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


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("repetition_penalty", 1.2),
    ("top_k", 5), ("min_p", 0.1), ("stop_token_ids", [3]), ("min_tokens", 4),
    ("structured_outputs", {"regex": "a+"}), ("logit_bias", {"5": 10}),
    ("response_format", {"type": "json_object"}), ("echo", True),
    ("include_stop_str_in_output", True), ("bad_words", ["x"]), ("cache_salt", "t1"),
    ("prompt_logprobs", 1), ("allowed_token_ids", [1, 2]),
])
def test_vllm_parameters_not_honoured_are_refused_not_ignored(field: str, value: object) -> None:
    assert CompletionRequest(model="m", prompt="x", **{field: value}).unsupported() == field


def test_vllm_defaults_and_their_equivalents_are_accepted() -> None:
    neutral = dict(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1.0, top_k=-1,
                   min_p=0.0, stop_token_ids=[], logit_bias={}, echo=False, logprobs=None,
                   response_format={"type": "text"}, priority=0, min_tokens=0)
    assert CompletionRequest(model="m", prompt="x", **neutral).unsupported() is None
    # completions: logprobs=0 asks for the sampled token's logprob (not neutral); chat: False
    assert CompletionRequest(model="m", prompt="x", logprobs=0).unsupported() == "logprobs"
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                 logprobs=False, top_logprobs=0, tool_choice="none")
    assert chat.unsupported() is None
    # what vLLM itself does not know is ignored, as vLLM's own server ignores it
    assert CompletionRequest(model="m", prompt="x", some_vendor_field=3).unsupported() is None


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_vllm_request_field_is_honoured_or_checked(kind: str) -> None:
    """Each field of the pinned vLLM's request model is either one the gateway honours, or
    refused when given a value that is not vLLM's default (a new vLLM field is too)."""
    from services.gateway.protocol import HONOURED, vllm_request_defaults

    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as Vllm)
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Vllm
    checked = vllm_request_defaults(kind)
    assert set(checked) == set(Vllm.model_fields) - HONOURED
    ours = ChatCompletionRequest if kind == "chat" else CompletionRequest
    base = {"model": "m", **({"messages": [{"role": "user", "content": "x"}]} if kind == "chat"
                             else {"prompt": "x"})}
    for field in checked:
        odd = {"odd": "value", "n": 7}  # no vLLM default equals this
        assert ours(**base, **{field: odd}).unsupported() == field, field
