"""The per-worker queue timeline bench samples from a real Redis registry during a run."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from bench.queue_timeline import QueueSample, sample_queues, summarize_timeline
from router.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerRole


async def test_samples_every_worker_and_spots_a_burst(r: Redis, redis_srv) -> None:
    reg = WorkerRegistry(r, "tl", ttl_s=5)
    busy = WorkerInfo(worker_id="b0", role=WorkerRole.BOTH, address="-", model="m",
                      load=WorkerLoad(num_running_reqs=2, num_waiting_reqs=3,
                                      pending_prefill_reqs=3, pending_prompt_tokens=2400,
                                      decoding_reqs=2, prefill_tokens_per_s=1800.0,
                                      updated_at=time.time()))
    idle = WorkerInfo(worker_id="b1", role=WorkerRole.BOTH, address="-", model="m",
                      load=WorkerLoad(updated_at=time.time()))
    await reg.register(busy)
    await reg.register(idle)
    async with sample_queues(redis_srv.url, "tl", interval_s=0.05) as samples:
        await asyncio.sleep(0.3)
    n = len(samples)
    await asyncio.sleep(0.1)
    assert len(samples) == n  # sampling stopped with the block
    by = {s.worker_id for s in samples}
    assert by == {"b0", "b1"} and n >= 6
    b0 = next(s for s in samples if s.worker_id == "b0")
    assert (b0.pending_prompt_tokens, b0.waiting, b0.prefill_tokens_per_s) == (2400, 3, 1800.0)
    summary = summarize_timeline(samples)
    assert summary["b0"]["burst_share"] == 1.0 and summary["b1"]["burst_share"] == 0.0
    assert summary["b0"]["peak_pending_prompt_tokens"] == 2400


def test_summary_counts_bursts_only_against_an_idle_peer() -> None:
    def s(t: float, wid: str, pending: int, running: int) -> QueueSample:
        return QueueSample(t_s=t, worker_id=wid, role="both", running=running, waiting=0,
                           pending_prefill_reqs=pending, pending_prompt_tokens=100 * pending,
                           decoding_reqs=0, prefill_tokens_per_s=0, step_s=0, age_s=0)
    samples = [s(0, "a", 1, 1), s(0, "b", 0, 0),   # a queues while b idles: a burst
               s(1, "a", 1, 1), s(1, "b", 0, 2)]   # b busy decoding: no burst
    out = summarize_timeline(samples)
    assert out["a"]["burst_share"] == 0.5 and out["a"]["mean_pending_prompt_tokens"] == 100
