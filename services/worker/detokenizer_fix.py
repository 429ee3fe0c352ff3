"""Streamed text for prompts that end inside a UTF-8 character (a fix for vLLM's detokenizer).

vLLM's ``FastIncrementalDetokenizer`` primes its ``tokenizers.decoders.DecodeStream`` with
``DecodeStream(ids=prompt_token_ids)``. When those ids end with byte tokens holding only part
of a multi-byte character, the stream never establishes its text prefix, and the first
character it completes comes back with the **whole prompt text** in front of it
(vllm-project/vllm#48853, open upstream; vLLM's slow detokenizer drops the character instead).

splitserve meets such prompts on every request migration: the next decode worker gets the
prompt plus the tokens generated so far, and a byte-level model may stop half-way through a
character at any token. Clients that send token-array prompts meet it too.

The fix: for those prompts only, the worker replaces the detokenizer's stream with one primed
token by token over the prompt's tail, which holds the incomplete character back until the
next generated token completes it, exactly as the original stream would have. Every other
request keeps vLLM's own code path.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)

#: Prompt tokens the stream is primed over. A character is at most 4 bytes, so this holds the
#: unfinished character and enough context for the tokenizer's decoder.
PRIME_WINDOW = 64
#: Prompt tokens decoded to tell whether the prompt ends inside a character.
TAIL_PROBE = 8
_REPLACEMENT = "\ufffd"
_installed = False


def ends_inside_character(tokenizer: Any, prompt_token_ids: Sequence[int],
                          skip_special_tokens: bool) -> bool:
    """Whether the prompt's text ends with an unfinished character (a `tokenizers.Tokenizer`)."""
    if not prompt_token_ids:
        return False
    tail = list(prompt_token_ids[-TAIL_PROBE:])
    return tokenizer.decode(tail, skip_special_tokens=skip_special_tokens).endswith(_REPLACEMENT)


def primed_stream(tokenizer: Any, prompt_token_ids: Sequence[int],
                  skip_special_tokens: bool) -> Any:
    """A `DecodeStream` that has stepped through the prompt's tail, one token at a time."""
    import tokenizers.decoders

    stream = tokenizers.decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
    for token_id in prompt_token_ids[-PRIME_WINDOW:]:
        stream.step(tokenizer, token_id)
    return stream


def fix_detokenizer(detokenizer: Any, request: Any) -> Any:
    """Re-prime a `FastIncrementalDetokenizer` whose prompt ends inside a character; any other
    detokenizer is returned as it is."""
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    if type(detokenizer) is not FastIncrementalDetokenizer:
        return detokenizer
    ids = getattr(request, "prompt_token_ids", None)
    skip = bool(getattr(detokenizer, "skip_special_tokens", True))
    tok = getattr(detokenizer, "tokenizer", None)
    if not ids or tok is None or not hasattr(detokenizer, "stream"):
        return detokenizer
    if ends_inside_character(tok, ids, skip):
        detokenizer.stream = primed_stream(tok, ids, skip)
    return detokenizer


def install() -> None:
    """Route vLLM's detokenizer construction through `fix_detokenizer` (once per process)."""
    global _installed
    if _installed:
        return
    from vllm.v1.engine import detokenizer as vllm_detok

    cls = getattr(vllm_detok, "IncrementalDetokenizer", None)
    original = getattr(cls, "from_new_request", None)
    if cls is None or original is None or not hasattr(vllm_detok, "FastIncrementalDetokenizer"):
        log.warning("vLLM's detokenizer changed shape; the partial-character prompt fix is off")
        return
    unbound = original.__func__

    def from_new_request(klass: Any, tokenizer: Any, request: Any) -> Any:
        return fix_detokenizer(unbound(klass, tokenizer, request), request)

    from_new_request.__doc__ = unbound.__doc__
    cls.from_new_request = classmethod(from_new_request)
    _installed = True
