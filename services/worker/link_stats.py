"""vLLM's request statistics for the engine link's requests.

A link request's outputs leave the worker before its output processor, which is where vLLM
computes per-request statistics (TTFT, inter-token latency, prompt tokens by source, finished
requests). This keeps those statistics for the link's requests the way vLLM's output
processor does (vllm/v1/engine/output_processor.py: `_update_stats_from_output`,
`_update_stats_from_finished`), so that the worker's own vLLM metrics and the router's engine
speed figures count every request the engine ran, whichever way it came.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest
    from vllm.v1.metrics.stats import IterationStats, RequestStateStats


@dataclass
class _Tracked:
    stats: "RequestStateStats"
    prompt_len: int
    max_tokens: int | None
    prefilling: bool = True
    num_cached_tokens: int = 0


class LinkRequestStats:
    """Per-request state of the link's requests, and one IterationStats per engine step."""

    def __init__(self) -> None:
        from vllm.v1.metrics.stats import LoRARequestStates

        self._requests: dict[str, _Tracked] = {}
        self._lora = LoRARequestStates(log_stats=False)

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: "EngineCoreRequest") -> None:
        from vllm.v1.metrics.stats import RequestStateStats

        params = request.sampling_params
        self._requests[request.request_id] = _Tracked(
            RequestStateStats(arrival_time=time.time()),  # this worker's clock, as a vLLM server's
            len(request.prompt_token_ids or ()),
            getattr(params, "max_tokens", None) if params is not None else None)

    def forget(self, request_id: str) -> None:
        """An aborted request: no finished-request statistics (vLLM counts none either)."""
        self._requests.pop(request_id, None)

    def step(self, outputs: "list[EngineCoreOutput]", timestamp: float) -> "IterationStats":
        """The statistics of one engine step's outputs of the link's requests."""
        from vllm.v1.metrics.stats import IterationStats

        it = IterationStats()
        for out in outputs:
            tracked = self._requests.get(out.request_id)
            if tracked is None:
                continue
            it.update_from_output(out, timestamp, tracked.prefilling, tracked.stats, self._lora,
                                  None)
            if tracked.prefilling:
                if out.prefill_stats is not None:
                    tracked.num_cached_tokens = out.prefill_stats.num_cached_tokens
                tracked.prefilling = False
            if out.finish_reason is not None:
                del self._requests[out.request_id]
                it.update_from_finished_request(
                    finish_reason=out.finish_reason, request_id=out.request_id,
                    num_prompt_tokens=tracked.prompt_len, max_tokens_param=tracked.max_tokens,
                    req_stats=tracked.stats, num_cached_tokens=tracked.num_cached_tokens)
        return it


def merged(a: "IterationStats | None", b: "IterationStats | None") -> "Any":
    """What the engine speed figures read of two IterationStats of one step, summed."""
    if a is None or b is None:
        return a if b is None else b
    from types import SimpleNamespace

    return SimpleNamespace(
        prompt_token_stats=SimpleNamespace(
            computed=a.prompt_token_stats.computed + b.prompt_token_stats.computed),
        num_generation_tokens=a.num_generation_tokens + b.num_generation_tokens,
        time_to_first_tokens_iter=a.time_to_first_tokens_iter + b.time_to_first_tokens_iter)
