"""The gateway's request figures (TTFT, inter-token latency, end-to-end duration, prompt,
cached and generated tokens) from vLLM's own per-request statistics: the front end's output
processor measures every request it serves, over HTTP and gRPC alike, and hands each step's
figures to its statistics loggers; one of them records them into the gateway's metrics
(services/gateway/metrics.py).

TTFT here runs from the request's arrival at the gateway to its first token: routing, the
prefill, the KV transfer and the first decode step, as a client sees it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from services.stat_logger import stat_logger

if TYPE_CHECKING:
    from services.gateway.metrics import GatewayMetrics


def gateway_stat_logger(metrics: "GatewayMetrics") -> Callable[..., Any]:
    """A vLLM stat-logger factory (`AsyncLLM(stat_loggers=[...])`) recording into `metrics`."""
    return stat_logger(lambda _, iteration: record_iteration(metrics, iteration))


def record_iteration(metrics: "GatewayMetrics", stats: Any) -> None:
    """One output step's figures (vLLM's IterationStats; None: none) into the gateway's
    metrics."""
    if stats is None:
        return
    for ttft in stats.time_to_first_tokens_iter:
        metrics.ttft.observe(ttft)
    for itl in stats.inter_token_latencies_iter:
        metrics.itl.observe(itl)
    for done in stats.finished_requests:
        metrics.e2e.observe(done.e2e_latency)
        metrics.prompt_tokens.inc(done.num_prompt_tokens)
        metrics.cached_tokens.inc(done.num_cached_tokens)
        metrics.completion_tokens.inc(done.num_generation_tokens)
