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
from typing import Any, AsyncIterator

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


class WorkerRequests(BaseModel):
    """One worker's requests in a run, seen from the client (route headers name the worker)."""

    requests: int = Field(description="requests whose prompt it computed")
    uncached_tokens: int = Field(description="prompt tokens it computed (prompt - cached)")
    mean_ahead_tokens: float = Field(description=(
        "per request: uncached prompt tokens of the requests on the same worker sent before "
        "it and still without their first token when it was sent (the queued prefill it "
        "really met), averaged"))
    peak_ahead_tokens: int = Field(description="the largest of those")
    ttft_ms: float = Field(description="sum of its requests' TTFT")
    peer_idle_ms: float = Field(description=(
        "of that time, the part during which another worker had no request at all (a "
        "burst onto this worker while a peer idled)"))
    behind_cold_ms: float = Field(description=(
        "of that time, the part a request whose prompt was mostly cached spent waiting while "
        "a mostly cold prefill sent before it on the same worker was unfinished"))


def summarize_requests(samples: list[Any]) -> dict[str, WorkerRequests]:
    """Per worker, from per-request samples (bench.stats.RequestSample with `worker`,
    `sent_ms`, `ttft_ms`, `e2e_ms`, `prompt_tokens`, `cached_tokens`): what each request
    met there. Requests without a worker (no route headers) are left out."""
    rows = [s for s in samples if s.worker and s.sent_ms is not None and s.ttft_ms is not None]
    unc = {id(s): max((s.prompt_tokens or 0) - (s.cached_tokens or 0), 0) for s in rows}
    workers = sorted({s.worker for s in rows})
    out: dict[str, WorkerRequests] = {}
    for w in workers:
        mine = [s for s in rows if s.worker == w]
        peers = [s for s in rows if s.worker != w]
        ahead = []
        peer_idle = behind = 0.0
        for s in mine:
            t0, t1 = s.sent_ms, s.sent_ms + s.ttft_ms
            ahead.append(sum(unc[id(o)] for o in mine if o is not s and o.sent_ms <= t0
                             < o.sent_ms + o.ttft_ms))
            if peers:
                peer_idle += _uncovered(t0, t1, [(o.sent_ms, o.sent_ms + (o.e2e_ms or o.ttft_ms))
                                                 for o in peers])
            if s.prompt_tokens and unc[id(s)] * 2 < s.prompt_tokens:  # mostly cached
                cold = [(o.sent_ms, o.sent_ms + o.ttft_ms) for o in mine if o is not s
                        and o.sent_ms <= t0 and o.prompt_tokens
                        and unc[id(o)] * 2 >= o.prompt_tokens]
                behind += (t1 - t0) - _uncovered(t0, t1, cold)
        out[w] = WorkerRequests(
            requests=len(mine), uncached_tokens=sum(unc[id(s)] for s in mine),
            mean_ahead_tokens=round(sum(ahead) / len(ahead), 1) if ahead else 0.0,
            peak_ahead_tokens=max(ahead, default=0),
            ttft_ms=round(sum(s.ttft_ms for s in mine), 1), peer_idle_ms=round(peer_idle, 1),
            behind_cold_ms=round(behind, 1))
    return out


def _uncovered(t0: float, t1: float, spans: list[tuple[float, float]]) -> float:
    """The length of [t0, t1] that none of `spans` covers."""
    covered = 0.0
    at = t0
    for a, b in sorted(spans):
        if b <= at or a >= t1:
            continue
        if a > at:
            at = a
        covered += min(b, t1) - at
        at = min(b, t1)
        if at >= t1:
            break
    return (t1 - t0) - covered
