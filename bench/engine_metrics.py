"""The engines' own counters, read from each live worker's Prometheus endpoint, and the
cluster's prefix-cache hit rate computed from them.

The live workers (and their `metrics_url` and role) come from the Redis worker registry; vLLM's
own server (the `--target vllm` baseline) is one engine that prefills and decodes, read at its
`/metrics` as a `both` worker. Every worker serves vLLM's metrics for its engine; bench reads,
summed over each worker's label sets:

- `vllm:prompt_tokens_total`: prompt tokens of the requests the engine served,
- `vllm:prompt_tokens_by_source_total{source=local_compute|local_cache_hit|external_kv_transfer}`:
  how the engine got each of those tokens (computed, found in its own prefix cache, or
  received from another engine over NIXL),
- `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`: the engine's own prefix
  cache lookups (tokens queried, tokens hit), reported per role for reference.

**prefix_hit_rate**: the fraction of the prompt tokens the cluster served that no engine had to
compute, because the engine that prefilled them found them in its prefix cache:

    served   = Σ over decode and both workers of Δ vllm:prompt_tokens_total
    computed = Σ over all workers of Δ vllm:prompt_tokens_by_source_total{source="local_compute"}
    prefix_hit_rate = 1 - computed / served

Why this and not Σhits/Σqueries over every engine: in disaggregated mode a prompt passes
through two engines. The prefill worker computes it (its hits are real savings); the decode
worker then looks it up in its own cache too and receives the rest over NIXL, so its queries
count every prompt a second time and its local hits on such requests save transfer, not
compute. Counting each prompt once, at the engine that generated the output (decode or both),
and counting compute wherever it happened gives exactly: hits of prefill/both workers, plus
decode workers' local hits on the requests they prefilled themselves (conditional
disaggregation), over prompt tokens served. In aggregated mode it equals vLLM's own
hits/queries. A decode worker that received the whole prompt over NIXL still computes at most
the last prompt token; that token counts as computed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

PROMPT_TOKENS = "vllm:prompt_tokens_total"
BY_SOURCE = "vllm:prompt_tokens_by_source_total"
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
XFER_TIME = "vllm:nixl_xfer_time_seconds"
XFER_BYTES = "vllm:nixl_bytes_transferred"
XFER_DESCS = "vllm:nixl_num_descriptors"
NIXL = tuple(f"{h}_{part}" for h in (XFER_TIME, XFER_BYTES, XFER_DESCS)
             for part in ("sum", "count"))
COUNTERS = (PROMPT_TOKENS, HITS, QUERIES, *NIXL)
SERVING_ROLES = ("decode", "both")


def parse_counters(text: str) -> dict[str, float]:
    """The counters bench uses from a Prometheus text page, summed over label sets (engine,
    model); by-source counters keyed as `name{source}`."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in COUNTERS:
                key = s.name
            elif s.name == BY_SOURCE and s.labels.get("source") in SOURCES:
                key = f"{BY_SOURCE}{{{s.labels['source']}}}"
            else:
                continue
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


@dataclass
class WorkerCounters:
    """One worker's counters at one moment."""

    worker_id: str
    role: str
    values: dict[str, float]

    def get(self, key: str) -> float:
        return self.values.get(key, 0.0)


@dataclass
class EngineSnapshot:
    """Every live worker's counters at one moment."""

    workers: dict[str, WorkerCounters] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EngineEndpoint:
    """One engine's Prometheus endpoint and the role it serves in."""

    worker_id: str
    role: str
    metrics_url: str


EndpointSource = Callable[[], Awaitable[list[EngineEndpoint]]]
"""Where a target's engines are: read anew at every scrape (workers come and go)."""


def registry_endpoints(redis_url: str, namespace: str) -> EndpointSource:
    """A splitserve cluster's live workers, from its Redis worker registry."""

    async def endpoints() -> list[EngineEndpoint]:
        from router.redis_client import RedisClientConfig, redis_client
        from router.registry import WorkerRegistry

        redis = redis_client(redis_url, RedisClientConfig().for_tools())
        try:
            workers = await WorkerRegistry(redis, namespace).live_workers()
        finally:
            await redis.aclose()
        return [EngineEndpoint(w.worker_id, w.role.value, w.metrics_url or "") for w in workers]

    return endpoints


def server_endpoints(metrics_url: str, worker_id: str = "vllm") -> EndpointSource:
    """A single engine that prefills and decodes (vLLM's own OpenAI server)."""

    async def endpoints() -> list[EngineEndpoint]:
        return [EngineEndpoint(worker_id, "both", metrics_url)]

    return endpoints


async def scrape(source: EndpointSource, timeout_s: float = 10.0) -> EngineSnapshot:
    """Fetch every engine's counters."""
    snap = EngineSnapshot()
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as http:
        async def one(e: EngineEndpoint) -> None:
            if not e.metrics_url:
                snap.errors.append(f"{e.worker_id}: no metrics URL in the registry")
                return
            try:
                r = await http.get(e.metrics_url)
                r.raise_for_status()
                snap.workers[e.worker_id] = WorkerCounters(e.worker_id, e.role,
                                                           parse_counters(r.text))
            except httpx.HTTPError as exc:
                snap.errors.append(f"{e.worker_id}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(e) for e in await source()))
    return snap


async def scrape_settled(source: EndpointSource, settle_s: float = 0.3,
                         max_wait_s: float = 5.0) -> EngineSnapshot:
    """Scrape until two consecutive snapshots agree (engines publish their last step's
    figures a moment after the stream ends), at most `max_wait_s`."""
    snap = await scrape(source)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait_s
    while loop.time() < deadline:
        await asyncio.sleep(settle_s)
        nxt = await scrape(source)
        same = {k: v.values for k, v in nxt.workers.items()} == {
            k: v.values for k, v in snap.workers.items()}
        snap = nxt
        if same:
            break
    return snap


class RoleCounters(BaseModel):
    """Counter increases over a run, summed over the workers of one role."""

    workers: int = Field(0, description="workers of this role seen")
    prompt_tokens: float = Field(0, description="Δ vllm:prompt_tokens_total")
    local_compute: float = Field(0, description="Δ prompt tokens computed")
    local_cache_hit: float = Field(0, description="Δ prompt tokens from the local prefix cache")
    external_kv_transfer: float = Field(0, description="Δ prompt tokens received over NIXL")
    prefix_cache_queries: float = Field(0, description="Δ vllm:prefix_cache_queries_total")
    prefix_cache_hits: float = Field(0, description="Δ vllm:prefix_cache_hits_total")


class PrefixCacheReport(BaseModel):
    """The prefix hit rate of a run and the counters it came from."""

    hit_rate: float | None = Field(description="1 - computed / served (None: nothing served)")
    served_prompt_tokens: float = Field(description="Δ prompt tokens of decode/both workers")
    computed_prompt_tokens: float = Field(description="Δ local_compute of all workers")
    by_role: dict[str, RoleCounters] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list, description="workers that could not be read")


class KvTransferReport(BaseModel):
    """The NIXL transfers decode engines made during a run, from vLLM's connector metrics
    (`vllm:nixl_xfer_time_seconds`, `vllm:nixl_bytes_transferred`,
    `vllm:nixl_num_descriptors`: one observation per transfer, i.e. per request whose KV was
    pulled)."""

    transfers: float = Field(description="Δ transfers")
    bytes: float = Field(description="Δ bytes moved")
    seconds: float = Field(description="Δ time spent in transfers (post to completion)")
    mean_mib: float | None = Field(None, description="MiB per transfer")
    mean_ms: float | None = Field(None, description="milliseconds per transfer")
    gb_s: float | None = Field(None, description="bytes / transfer time, in GB/s (1e9)")
    mean_descriptors: float | None = Field(None, description=(
        "NIXL descriptors per transfer after merging (one per run of neighbouring blocks)"))


def kv_transfer_report(before: EngineSnapshot, after: EngineSnapshot) -> KvTransferReport | None:
    """Δ of the decode engines' NIXL histograms (None when no decode worker was seen)."""
    total = {k: 0.0 for k in NIXL}
    seen = False
    for wid, w in after.workers.items():
        if w.role != "decode":
            continue
        seen = True
        prev = before.workers.get(wid)
        for k in NIXL:
            total[k] += _delta(w.get(k), prev.get(k) if prev else 0.0)
    if not seen:
        return None
    n, nbytes = total[f"{XFER_TIME}_count"], total[f"{XFER_BYTES}_sum"]
    secs = total[f"{XFER_TIME}_sum"]
    ndesc = total[f"{XFER_DESCS}_count"]
    return KvTransferReport(
        transfers=n, bytes=nbytes, seconds=secs,
        mean_mib=nbytes / n / 2**20 if n else None, mean_ms=secs / n * 1000 if n else None,
        gb_s=nbytes / secs / 1e9 if secs > 0 else None,
        mean_descriptors=total[f"{XFER_DESCS}_sum"] / ndesc if ndesc else None)


def _delta(after: float, before: float) -> float:
    # A counter that went down means the engine restarted: count from zero.
    return after - before if after >= before else after


def prefix_cache_report(before: EngineSnapshot, after: EngineSnapshot) -> PrefixCacheReport:
    """Counter increases between two snapshots, per role, and the prefix hit rate."""
    by_role: dict[str, RoleCounters] = {}
    for wid, w in after.workers.items():
        prev = before.workers.get(wid)

        def d(key: str) -> float:
            return _delta(w.get(key), prev.get(key) if prev else 0.0)

        rc = by_role.setdefault(w.role, RoleCounters())
        rc.workers += 1
        rc.prompt_tokens += d(PROMPT_TOKENS)
        rc.prefix_cache_queries += d(QUERIES)
        rc.prefix_cache_hits += d(HITS)
        for src in SOURCES:
            setattr(rc, src, getattr(rc, src) + d(f"{BY_SOURCE}{{{src}}}"))
    served = sum(rc.prompt_tokens for role, rc in by_role.items() if role in SERVING_ROLES)
    computed = sum(rc.local_compute for rc in by_role.values())
    rate = None if served <= 0 else min(1.0, max(0.0, 1.0 - computed / served))
    return PrefixCacheReport(hit_rate=rate, served_prompt_tokens=served,
                             computed_prompt_tokens=computed, by_role=by_role,
                             errors=[*before.errors, *after.errors])
