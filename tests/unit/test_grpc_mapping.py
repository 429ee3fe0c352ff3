"""The gRPC API's messages as vLLM's OpenAI request bodies (validated by vLLM's own request
models), and vLLM's streamed chunks as CompletionChunks."""

from __future__ import annotations

import pytest

from services.gateway.grpc_mapping import MappingError, chat_body, chunks, completion_body
from splitserve_sdk import _common as c
from splitserve_sdk.proto.v1 import inference_pb2 as ipb

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def test_every_sampling_field_reaches_vllms_request_model() -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    req = c.complete_request("m", [1, 2, 3], max_tokens=5, temperature=0.5, top_p=0.9, seed=7,
                             stop=["x"], ignore_eos=True, top_k=4, min_p=0.1,
                             presence_penalty=0.5, frequency_penalty=0.25,
                             repetition_penalty=1.2, stop_token_ids=[9], min_tokens=2,
                             logprobs=3, n=2, logit_bias={11: -5.0}, regex="a+",
                             include_stop_str_in_output=True)
    body = completion_body(req)
    model = CompletionRequest.model_validate(body)
    assert model.max_tokens == 5
    params = model.to_sampling_params(5, {})
    # proto floats are 32 bits: the decimals they were written from, not 0.899999976
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 7)
    assert (params.top_k, params.min_p, params.n, params.min_tokens) == (4, 0.1, 2, 2)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.5, 0.25, 1.2)
    assert params.stop == ["x"] and params.stop_token_ids == [9] and params.ignore_eos
    assert params.include_stop_str_in_output and params.logprobs == 3
    assert params.logit_bias == {11: -5.0}
    assert params.structured_outputs is not None and params.structured_outputs.regex == "a+"
    assert model.prompt == [1, 2, 3] and body["stream"] and body["return_token_ids"]


def test_unset_fields_keep_vllms_defaults() -> None:
    body = completion_body(c.complete_request("m", "hi"))
    assert body == {"model": "m", "prompt": "hi", "stream": True,
                    "stream_options": {"include_usage": True}, "return_token_ids": True}


def test_chat_tools_choice_and_tool_turns() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [
                    {"id": "call_1", "function": {"name": "get_weather",
                                                  "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    req = c.chat_request("m", messages, [WEATHER], "get_weather", logprobs=2)
    body = chat_body(req)
    assert body["tools"] == [WEATHER]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert body["messages"][2]["tool_call_id"] == "call_1"
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    ChatCompletionRequest.model_validate(body)
    schema = chat_body(c.chat_request("m", messages[:1], json_schema={"type": "object"}))
    assert schema["structured_outputs"] == {"json": {"type": "object"}}
    assert chat_body(c.chat_request("m", messages, [WEATHER], "required"))["tool_choice"] == (
        "required")


def test_parameters_that_are_not_json_are_refused_by_name() -> None:
    req = c.chat_request("m", [("user", "hi")], [{"name": "f", "parameters": "{oops"}])
    with pytest.raises(MappingError, match=r"tools\[0\]\.parameters_json is not JSON"):
        chat_body(req)
    bad = ipb.CompleteRequest(model="m", text="x")
    bad.sampling.structured_output.json_schema = "[1,"
    with pytest.raises(MappingError, match="json_schema is not JSON"):
        completion_body(bad)


def test_sdk_takes_one_structured_output_at_most() -> None:
    with pytest.raises(ValueError, match="at most one structured output"):
        c.sampling(regex="a", choice=["b"])


def test_chat_chunks_by_choice_with_tool_calls_and_logprobs() -> None:
    event = {"id": "chatcmpl-1", "choices": [
        {"index": 1, "delta": {"content": "Hi", "tool_calls": [
            {"index": 0, "id": "call_9", "function": {"name": "f", "arguments": "{"}}]},
         "token_ids": [5, 6], "finish_reason": None,
         "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                   "top_logprobs": [{"token": "Hi", "logprob": -0.5},
                                                    {"token": "Ho", "logprob": -1.5}]}]}},
        {"index": 0, "delta": {}, "token_ids": [], "finish_reason": "tool_calls"}]}
    one, two = list(chunks(event, "chatcmpl-1"))
    assert (one.index, one.text, list(one.token_ids)) == (1, "Hi", [5, 6])
    assert (one.tool_calls[0].id, one.tool_calls[0].name, one.tool_calls[0].arguments) == (
        "call_9", "f", "{")
    assert one.logprobs[0].token == "Hi" and [t.token for t in one.logprobs[0].top] == [
        "Hi", "Ho"]
    assert two.index == 0 and two.finish_reason == "tool_calls"


def test_completion_chunks_and_usage() -> None:
    event = {"id": "cmpl-1", "choices": [
        {"index": 0, "text": " a", "token_ids": [7], "finish_reason": "length",
         "logprobs": {"tokens": [" a"], "token_logprobs": [-0.25], "text_offset": [0],
                      "top_logprobs": [{" a": -0.25, " b": -2.0}]}}]}
    (out,) = chunks(event, "cmpl-1")
    assert out.text == " a" and out.finish_reason == "length"
    assert {t.token: t.logprob for t in out.logprobs[0].top} == {" a": -0.25, " b": -2.0}
    (usage,) = chunks({"id": "cmpl-1", "choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 2}}}, "cmpl-1")
    assert (usage.usage.prompt_tokens, usage.usage.total_tokens, usage.usage.cached_tokens) == (
        3, 4, 2)
