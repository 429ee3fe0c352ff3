"""A vLLM statistics logger that hands each engine step's figures to a function: how the gateway
(its request metrics) and a worker (its load and speed) follow what vLLM measures."""

from __future__ import annotations

from typing import Any, Callable

OnStep = Callable[[Any, Any], None]
"""Called with (scheduler stats or None, iteration stats or None) of one engine step."""


def stat_logger(on_step: OnStep) -> Callable[..., Any]:
    """A factory for `AsyncLLM(stat_loggers=[...])` whose logger calls `on_step`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            on_step(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return StepStatLogger
