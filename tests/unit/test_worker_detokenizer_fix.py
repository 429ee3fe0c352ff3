"""The worker's fix for vLLM's streamed text when a prompt ends inside a UTF-8 character
(services/worker/detokenizer_fix.py), on vLLM's real detokenizer classes and the built-in
model's byte-level tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from services.controller.builtin_model import ensure_builtin_model
from services.worker import detokenizer_fix
from tests.support.cluster import cache_dir_for_tests

TEXT = " café 🙂 naïve 日本 € done"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(ensure_builtin_model(cache_dir_for_tests(), "tiny")))


def request(prompt: list[int]) -> Any:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(
        request_id="r", prompt_token_ids=prompt, mm_features=None,
        sampling_params=SamplingParams(max_tokens=100, ignore_eos=True), pooling_params=None,
        arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None)


def stream_text(detokenizer: Any, generated: list[int]) -> str:
    """What a client is streamed: one delta per generated token."""
    out = ""
    for t in generated:
        detokenizer.update([t], False)
        out += detokenizer.get_next_output_text(False, True)
    return out


def upstream(tokenizer: Any, prompt: list[int]) -> Any:
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    return FastIncrementalDetokenizer(tokenizer, request(prompt))


def fixed(tokenizer: Any, prompt: list[int]) -> Any:
    return detokenizer_fix.fix_detokenizer(upstream(tokenizer, prompt), request(prompt))


def test_the_byte_level_tokenizer_splits_characters(tokenizer: Any) -> None:
    # the premise of every test below: these characters take several tokens
    for ch in "é🙂日€":
        assert len(tokenizer.encode(ch, add_special_tokens=False)) >= 2, ch


def test_prompt_ending_inside_a_character_streams_only_new_text(tokenizer: Any) -> None:
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    prompt = tokenizer.encode("Emoji ahead:") + tokenizer.encode(" ", add_special_tokens=False)
    prompt += emoji[:2]
    generated = emoji[2:] + tokenizer.encode(" and more", add_special_tokens=False)
    assert detokenizer_fix.ends_inside_character(tokenizer._tokenizer, prompt, True)
    assert stream_text(fixed(tokenizer, prompt), generated) == "🙂 and more"


def test_upstream_still_leaks_the_prompt(tokenizer: Any) -> None:
    """Guard: vLLM's own stream repeats the prompt text (vllm-project/vllm#48853). When this
    fails, vLLM has fixed it and services/worker/detokenizer_fix.py can go."""
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    prompt = tokenizer.encode("Emoji ahead:") + emoji[:2]
    text = stream_text(upstream(tokenizer, prompt), emoji[2:])
    assert "Emoji ahead" in text


def test_migration_at_every_token_gives_the_unbroken_text(tokenizer: Any) -> None:
    """A request handed over after any generated token (the next worker's prompt is the
    prompt plus the tokens so far) streams exactly what one worker would have streamed."""
    prompt = tokenizer.encode("A request moves between workers:")
    generated = tokenizer.encode(TEXT, add_special_tokens=False)
    whole = stream_text(upstream(tokenizer, prompt), generated)
    assert whole == TEXT
    split_mid_char = 0
    for k in range(1, len(generated)):
        head = stream_text(upstream(tokenizer, prompt), generated[:k])
        tail = stream_text(fixed(tokenizer, prompt + generated[:k]), generated[k:])
        assert head + tail == whole, (k, head, tail)
        split_mid_char += detokenizer_fix.ends_inside_character(
            tokenizer._tokenizer, prompt + generated[:k], True)
    assert split_mid_char >= 5  # the splits that needed the fix were exercised


def test_other_prompts_keep_vllms_stream(tokenizer: Any) -> None:
    prompt = tokenizer.encode("A prompt that ends with a whole word")
    det = upstream(tokenizer, prompt)
    stream = det.stream
    assert detokenizer_fix.fix_detokenizer(det, request(prompt)).stream is stream


def test_install_routes_vllm_through_the_fix(tokenizer: Any) -> None:
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    detokenizer_fix.install()
    detokenizer_fix.install()  # idempotent
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    prompt = tokenizer.encode("Emoji ahead:") + emoji[:3]
    det = IncrementalDetokenizer.from_new_request(tokenizer, request(prompt))
    assert stream_text(det, emoji[3:]) == "🙂"
