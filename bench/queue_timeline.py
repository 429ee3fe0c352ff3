"""A per-worker queue timeline: every worker's published load, sampled from the registry
while a run goes on (what `route` saw, at the registry's freshness).

Each sample is one worker at one moment: seconds since the run started, the worker, and its
engine's running / waiting requests, the requests and prompt tokens waiting for a first token,
the decoding batch, and the measured prefill speed and step time. Read it for bursts onto one
worker while another idles, or cold prefills queued ahead of cached requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

from pydantic import BaseModel, Field


class QueueSample(BaseModel):
    """One worker's published load at one moment of a run."""

    t_s: float = Field(description="seconds since the run started")
    worker_id: str
    role: str
    running: int = Field(description="engine: running requests")
    waiting: int = Field(description="engine: waiting requests")
    pending_prefill_reqs: int = Field(description="requests waiting for their first token")
    pending_prompt_tokens: int = Field(description="their prompt tokens")
    decoding_reqs: int = Field(description="requests past their first token")
    prefill_tokens_per_s: float = Field(description="measured prefill speed")
    step_s: float = Field(description="measured decode-only step time, fixed part")
    age_s: float = Field(description="how old the published figures were when read")


@contextlib.asynccontextmanager
async def sample_queues(redis_url: str, namespace: str, interval_s: float = 0.25
                        ) -> AsyncIterator[list[QueueSample]]:
    """Samples every live worker's load every `interval_s` while the block runs; the list
    fills as it goes (complete once the block has exited)."""
    from redis.asyncio import Redis

    from router.redis_client import stop_task
    from router.registry import WorkerRegistry

    out: list[QueueSample] = []
    redis = Redis.from_url(redis_url)
    registry = WorkerRegistry(redis, namespace)
    t0 = time.time()

    async def loop() -> None:
        while True:
            now = time.time()
            try:
                workers = await registry.live_workers()
            except Exception:  # a lost sample is no reason to fail the run
                workers = []
            for w in workers:
                ld = w.load
                out.append(QueueSample(
                    t_s=round(now - t0, 3), worker_id=w.worker_id, role=w.role.value,
                    running=ld.num_running_reqs, waiting=ld.num_waiting_reqs,
                    pending_prefill_reqs=ld.pending_prefill_reqs,
                    pending_prompt_tokens=ld.pending_prompt_tokens,
                    decoding_reqs=ld.decoding_reqs,
                    prefill_tokens_per_s=ld.prefill_tokens_per_s, step_s=ld.step_s,
                    age_s=round(max(now - ld.updated_at, 0.0), 3)))
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    try:
        yield out
    finally:
        await stop_task(task)
        await redis.aclose()


def summarize_timeline(samples: list[QueueSample]) -> dict[str, dict[str, float]]:
    """Per worker: samples, mean and peak prompt tokens waiting, the share of samples where
    it had prompt work waiting while another worker of its role had none (a burst)."""
    by_t: dict[float, list[QueueSample]] = {}
    for s in samples:
        by_t.setdefault(s.t_s, []).append(s)
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        o = out.setdefault(s.worker_id, {"samples": 0, "mean_pending_prompt_tokens": 0.0,
                                         "peak_pending_prompt_tokens": 0, "burst_share": 0.0})
        o["samples"] += 1
        o["mean_pending_prompt_tokens"] += s.pending_prompt_tokens
        o["peak_pending_prompt_tokens"] = max(o["peak_pending_prompt_tokens"],
                                              s.pending_prompt_tokens)
        peers = [p for p in by_t[s.t_s] if p.role == s.role and p.worker_id != s.worker_id]
        if s.pending_prefill_reqs > 0 and any(p.running + p.waiting == 0 for p in peers):
            o["burst_share"] += 1
    for o in out.values():
        n = o["samples"] or 1
        o["mean_pending_prompt_tokens"] = round(o["mean_pending_prompt_tokens"] / n, 1)
        o["burst_share"] = round(o["burst_share"] / n, 3)
    return out
