"""Where the planner's latency and throughput figures come from.

- `DirectSource` scrapes every live worker's `metrics_url` (from the Redis registry) and
  computes windowed figures from the difference between the newest scrape and the one taken
  about `window_s` earlier: no Prometheus server needed.
- `PrometheusSource` asks a Prometheus server (`/api/v1/query`) with configurable PromQL.

Both return `PoolFigures` per pool: TTFT p90 of the prefill pool's engines, ITL p90 of the
decode pool's engines (an aggregated cluster's pool `both`: both figures), prompt tokens per
second each pool computed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass
from string import Template
from typing import Callable, Protocol

import httpx

from router.registry import WorkerInfo
from services.controller.pool_sizes import POOLS
from services.planner.config import PrometheusQueries
from services.planner.histogram import Histogram, Page, parse_page

log = logging.getLogger(__name__)

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
PROMPT_COMPUTED = 'vllm:prompt_tokens_by_source{source="local_compute"}'
PROMPT_TOTAL = "vllm:prompt_tokens"
QUANTILE = 0.9
TTFT_POOLS = ("prefill", "both")  # the pools whose engines compute first tokens
ITL_POOLS = ("decode", "both")  # the pools whose engines decode


@dataclass(frozen=True)
class PoolFigures:
    """Windowed figures of one pool; None where the window holds no observation."""

    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    prompt_tokens_per_s: float | None = None
    complete: bool = True


class MetricsSource(Protocol):
    """Gives each pool's windowed figures."""

    async def collect(self, workers: list[WorkerInfo]) -> dict[str, PoolFigures]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Scrape:
    t: float
    page: Page


class DirectSource:
    """Scrapes the workers' own Prometheus endpoints and keeps a window of scrapes per worker."""

    def __init__(self, window_s: float, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.clock = clock
        self._http = httpx.AsyncClient(timeout=timeout_s, trust_env=False)
        self._history: dict[str, collections.deque[_Scrape]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _scrape(self, w: WorkerInfo) -> _Scrape | None:
        if not w.metrics_url:
            log.warning("worker %s has no metrics_url in the registry", w.worker_id)
            return None
        try:
            r = await self._http.get(w.metrics_url)
            r.raise_for_status()
            page = parse_page(r.text, (TTFT, ITL), (PROMPT_COMPUTED, PROMPT_TOTAL))
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot scrape %s at %s: %s", w.worker_id, w.metrics_url, exc)
            return None
        return _Scrape(self.clock(), page)

    def _baseline(self, w: WorkerInfo, now: float) -> _Scrape | None:
        """Where the window starts: the newest kept scrape at least window_s old (else the
        oldest kept); for a worker's first scrape, its start if that is within the window
        (its counters then cover exactly the window), else nothing."""
        hist = self._history.get(w.worker_id)
        if hist:
            while len(hist) > 1 and hist[1].t <= now - self.window_s:
                hist.popleft()
            return hist[0]
        if w.started_at > 0 and w.started_at >= now - self.window_s:
            return _Scrape(w.started_at, Page({}, {}))
        return None

    async def collect(self, workers: list[WorkerInfo]) -> dict[str, PoolFigures]:
        pools = {p: [w for w in workers if w.role.value == p] for p in POOLS}
        scrapes = await asyncio.gather(*(self._scrape(w) for ws in pools.values() for w in ws))
        flat = [w for ws in pools.values() for w in ws]
        by_id = dict(zip((w.worker_id for w in flat), scrapes))
        out: dict[str, PoolFigures] = {}
        for pool, ws in pools.items():
            ttft, itl, tokens, seconds, complete = Histogram(), Histogram(), 0.0, 0.0, True
            for w in ws:
                cur = by_id[w.worker_id]
                if cur is None:
                    complete = False
                    continue
                base = self._baseline(w, cur.t)
                self._history.setdefault(w.worker_id, collections.deque()).append(cur)
                if base is None or cur.t <= base.t:
                    continue
                ttft = ttft.plus(cur.page.histograms[TTFT].minus(
                    base.page.histograms.get(TTFT, Histogram())))
                itl = itl.plus(cur.page.histograms[ITL].minus(
                    base.page.histograms.get(ITL, Histogram())))
                key = PROMPT_COMPUTED if PROMPT_COMPUTED in cur.page.counters else PROMPT_TOTAL
                delta = cur.page.counters.get(key, 0.0) - base.page.counters.get(key, 0.0)
                tokens += delta if delta >= 0 else cur.page.counters.get(key, 0.0)
                seconds = max(seconds, cur.t - base.t)
            out[pool] = PoolFigures(
                ttft_p90_s=ttft.quantile(QUANTILE), itl_p90_s=itl.quantile(QUANTILE),
                prompt_tokens_per_s=tokens / seconds if seconds > 0 else None, complete=complete)
        live = {w.worker_id for w in workers}
        for gone in set(self._history) - live:
            del self._history[gone]
        return out


class PrometheusSource:
    """Reads the figures from a Prometheus server's HTTP API."""

    def __init__(self, url: str, queries: PrometheusQueries, window_s: float,
                 timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/") + "/api/v1/query"
        self.queries = queries
        self.window_s = window_s
        self._http = httpx.AsyncClient(timeout=timeout_s, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def query(self, promql: str) -> float | None:
        """The value of an instant query's first sample; None when empty or NaN."""
        r = await self._http.get(self.url, params={"query": promql})
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"prometheus: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        result = data.get("result")
        if data.get("resultType") == "scalar":
            value = float(result[1])
        elif not result:
            return None
        else:
            value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value

    def _render(self, template: str, pool: str) -> str:
        return Template(template).substitute(pool=pool, window=f"{self.window_s:g}",
                                             q=f"{QUANTILE:g}")

    async def collect(self, workers: list[WorkerInfo]) -> dict[str, PoolFigures]:
        out: dict[str, PoolFigures] = {}
        q = self.queries
        for pool in POOLS:
            try:
                ttft = await self.query(self._render(q.ttft, pool)) if pool in TTFT_POOLS else None
                itl = await self.query(self._render(q.itl, pool)) if pool in ITL_POOLS else None
                rate = await self.query(self._render(q.prompt_tokens_per_s, pool))
                out[pool] = PoolFigures(ttft, itl, rate)
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                log.warning("prometheus query for %s failed: %s", pool, exc)
                out[pool] = PoolFigures(complete=False)
        return out
