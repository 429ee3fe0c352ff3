"""The vLLM front end's body checks (services/gateway/body_checks.py): a structured_outputs
that is not an object is refused with a 400, because the pinned vLLM's request validators
crash on it; the first test fails once vLLM no longer does, so that the check can go."""

from __future__ import annotations

import json

import pytest

from services.gateway.body_checks import frontend_body_refusal


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_vllm_crashes_on_a_structured_outputs_that_is_not_an_object(kind: str) -> None:
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as M

        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as M

        body = {"model": "m", "prompt": "hi"}
    with pytest.raises(AttributeError):  # not a ValidationError: vLLM's server answers 500
        M.model_validate({**body, "structured_outputs": "json"})


@pytest.mark.parametrize("value", ["json", ["a"], 3])
def test_a_structured_outputs_that_is_not_an_object_is_refused(value: object) -> None:
    err = frontend_body_refusal(json.dumps({"model": "m", "prompt": "p",
                                            "structured_outputs": value}).encode())
    assert err is not None and err.status == 400 and err.param == "structured_outputs"


def test_what_vllm_takes_passes() -> None:
    for extra in ({"structured_outputs": {"regex": "a+"}}, {"structured_outputs": None}, {}):
        assert frontend_body_refusal(json.dumps({"model": "m", "prompt": "p", **extra}
                                                ).encode()) is None
    assert frontend_body_refusal(b"{not json") is None  # vLLM's own answer
    refused = frontend_body_refusal(json.dumps({"model": "m", "prompt": "p",
                                                "kv_transfer_params": {}}).encode())
    assert refused is not None and refused.param == "kv_transfer_params"
