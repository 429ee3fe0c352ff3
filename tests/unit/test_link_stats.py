"""vLLM's request statistics of the engine link's requests (services/worker/link_stats.py),
on vLLM's own output, request and statistics classes: what vLLM's output processor would have
counted for the same outputs."""

from __future__ import annotations

import time

from vllm.sampling_params import SamplingParams
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.metrics.stats import PrefillStats

from services.worker.link_stats import LinkRequestStats, merged


def request(rid: str, prompt_len: int, max_tokens: int) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=rid, prompt_token_ids=list(range(prompt_len)), mm_features=None,
        sampling_params=SamplingParams(max_tokens=max_tokens), pooling_params=None,
        arrival_time=time.time(), lora_request=None, cache_salt=None, data_parallel_rank=None)


def output(rid: str, tokens: list[int], prefill: PrefillStats | None = None,
           finish: FinishReason | None = None) -> EngineCoreOutput:
    return EngineCoreOutput(request_id=rid, new_token_ids=tokens, prefill_stats=prefill,
                            finish_reason=finish)


def test_a_request_through_its_steps() -> None:
    stats = LinkRequestStats()
    stats.add(request("a", 100, 3))
    stats.add(request("b", 40, 8))
    prefill = PrefillStats()
    prefill.set(num_prompt_tokens=100, num_local_cached_tokens=32, num_external_cached_tokens=0)
    first = stats.step([output("a", [5], prefill), output("unknown", [1])], time.monotonic())
    assert len(first.time_to_first_tokens_iter) == 1 and first.num_generation_tokens == 1
    ptc = first.prompt_token_stats
    assert (ptc.total, ptc.computed, ptc.local_cache_hit) == (100, 68, 32)
    second = stats.step([output("a", [6])], time.monotonic())
    assert len(second.inter_token_latencies_iter) == 1 and not second.time_to_first_tokens_iter
    last = stats.step([output("a", [7], finish=FinishReason.LENGTH)], time.monotonic())
    (done,) = last.finished_requests
    assert (done.num_prompt_tokens, done.num_generation_tokens, done.max_tokens_param,
            done.num_cached_tokens, done.finish_reason) == (100, 3, 3, 32, FinishReason.LENGTH)
    assert len(stats) == 1  # b is still running
    stats.forget("b")  # aborted: no finished-request statistics
    assert len(stats) == 0 and not stats.step([output("b", [1])], 0.0).finished_requests


def test_merged_sums_what_the_speed_figures_read() -> None:
    stats = LinkRequestStats()
    stats.add(request("a", 64, 2))
    prefill = PrefillStats()
    prefill.set(num_prompt_tokens=64, num_local_cached_tokens=0, num_external_cached_tokens=0)
    link = stats.step([output("a", [1], prefill)], time.monotonic())
    assert merged(None, link) is link and merged(link, None) is link
    both = merged(link, merged(link, None))
    assert both.prompt_token_stats.computed == 128 and both.num_generation_tokens == 2
    assert len(both.time_to_first_tokens_iter) == 2
