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


def test_request_timeline_finds_bursts_queued_prefill_and_cold_prefills_ahead() -> None:
    """Per worker, from the client's samples: the uncached prefill each request met there,
    the time it waited while the other worker had nothing, and the time a cached request
    waited behind a cold prefill sent before it."""
    from bench.queue_timeline import summarize_requests
    from bench.stats import RequestSample

    def req(i: int, worker: str, sent: float, ttft: float, e2e: float, prompt: int,
            cached: int) -> RequestSample:
        return RequestSample(ttft_ms=ttft, output_tokens=4, chunks=4, index=i, sent_ms=sent,
                             e2e_ms=e2e, worker=worker, prompt_tokens=prompt,
                             cached_tokens=cached)

    samples = [
        # a: a cold 800-token prefill at 0, then two cached requests behind it
        req(0, "a", 0, 1000, 1200, 800, 0),
        req(1, "a", 100, 1100, 1300, 800, 700),   # waits 100..1000 behind the cold one
        req(2, "a", 200, 1000, 1400, 800, 760),
        # b: one request 0..300, then idle until 2000
        req(3, "b", 0, 100, 300, 200, 0),
        req(4, "b", 2000, 100, 300, 200, 0),
        req(5, "x", 0, None, None, 10, 0),        # no TTFT: left out
    ]
    samples[-1].ttft_ms = None
    out = summarize_requests(samples)
    assert set(out) == {"a", "b"}
    a, b = out["a"], out["b"]
    assert (a.requests, a.uncached_tokens) == (3, 800 + 100 + 40)
    # request 0 met nothing, 1 met the cold 800, 2 met 800 + 100
    assert (a.mean_ahead_tokens, a.peak_ahead_tokens) == (round((0 + 800 + 900) / 3, 1), 900)
    # b worked 0..300 only: request 0 waited 0..1000 with b idle from 300 (700 ms), request 1
    # 100..1200 (900 ms), request 2 200..1200 (900 ms)
    assert a.peer_idle_ms == 700 + 900 + 900
    # the cached ones: 1 waited 100..1000 behind the cold prefill, 2 waited 200..1000
    assert a.behind_cold_ms == 900 + 800
    assert (b.requests, b.behind_cold_ms, b.mean_ahead_tokens) == (2, 0.0, 0.0)
    # b's second request ran while a was idle (a's last ended at 1600)
    assert b.peer_idle_ms == 100
