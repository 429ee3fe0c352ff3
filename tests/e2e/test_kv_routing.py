"""KV-aware routing on whole clusters: the index is fed by the engines' own KV events, shared
by gateways through Redis, and decides between remote and local prefill."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.block_hash import BlockHasher
from router.kv_events import BlockRemoved, BlockStored
from router.prefix_index import PrefixIndex
from router.redis_client import redis_client
from router.registry import WorkerInfo, WorkerRegistry
from services.cluster_secret import FILE_ENV, FILE_NAME
from services.ports import free_port
from tests.e2e.conftest import PROMPT_TOKENS_DETAILS
from tests.e2e.test_observability import documented_metrics
from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e
MODEL = "splitserve-tiny"


def post(base: str, prompt: str | list[int], max_tokens: int = 4) -> httpx.Response:
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture
def second_gateway(aggregated: RunningCluster, model_dir: Path) -> Iterator[str]:
    """Another gateway process on the same cluster: shares nothing with the first but Redis.
    It routes from a local replica of the index and follows the registry's change log (the
    first one asks Redis), so both ways of reading the index and registry serve a cluster."""
    port = free_port()
    log = open(aggregated.run_dir / "gateway-2.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "gateway", "--model", str(model_dir),
         "--served-model-name", MODEL, "--redis-url", aggregated.redis_url, "--port", str(port),
         "--policy", "kv", "--route-headers", f"--frontend-arg={PROMPT_TOKENS_DETAILS}",
         "--index-replica", "--registry-feed"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, FILE_ENV: str(aggregated.run_dir / FILE_NAME)})
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (aggregated.run_dir / "gateway-2.log").read_text()
            assert time.monotonic() < deadline, "second gateway not ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(15)


def test_second_gateway_routes_to_the_cache_the_first_created(
        aggregated: RunningCluster, second_gateway: str) -> None:
    shared = "Shared system prompt of a long multi-turn conversation about the index. " * 16
    first = post(aggregated.http, shared + "First question?")
    owner = first.headers["x-splitserve-decode-worker"]
    n = first.json()["usage"]["prompt_tokens"]
    assert n > 8 * 32
    # The owner's engine publishes the blocks it stored; its worker applies them to Redis.
    time.sleep(1.5)
    for i in range(4):
        r = post(second_gateway, shared + f"Follow-up number {i}?")
        assert r.headers["x-splitserve-decode-worker"] == owner, "did not follow the cache"
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= (n // 32 - 1) * 32, f"engine reports only {cached} cached tokens"
    # ... and it routed from its replica, not by Redis lookups
    # (a lookup while the replica is not synced, e.g. the machine stalled it for over a
    # second, asks Redis instead)
    metrics = httpx.get(f"{second_gateway}/metrics", timeout=10).text
    lookups = {src: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               for src in ("replica", "redis")
               if line.startswith(f'splitserve_gateway_index_lookups_total{{source="{src}"}}')}
    assert lookups["replica"] >= 1 and lookups["replica"] + lookups["redis"] == 4, lookups
    assert "splitserve_gateway_registry_feed_synced 1.0" in metrics
    # every metric docs/metrics.md lists for a gateway with its replicas on is there
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    documented = documented_metrics()["Gateway, with its local replicas on"]
    assert len(documented) >= 8
    for name, mtype, labels in documented:
        fam = families.get(name)
        assert fam is not None and fam.type == mtype, (name, mtype)
        assert fam.samples and all(set(labels) <= set(s.labels) for s in fam.samples), name
    text = httpx.get(f"{second_gateway}/metrics", timeout=10).text
    line = next(x for x in text.splitlines()
                if x.startswith("splitserve_gateway_predicted_cached_blocks_sum"))
    assert float(line.split()[-1]) >= 4 * (n // 32 - 1)
    assert "splitserve_gateway_index_lookup_seconds_count 4.0" in text


def test_conditional_disaggregation(disagg: RunningCluster) -> None:
    # A short prompt: nothing worth moving, the decode worker prefills it itself.
    short = post(disagg.http, "A short prompt.")
    assert short.headers["x-splitserve-prefill-worker"] == "local"
    assert short.headers["x-splitserve-route-reason"] == "short_uncached_remainder"
    # A long new prompt: prefill worker computes it, KV moves to decode.
    long_prompt = "A long prompt that nobody has seen before, about conditional routing. " * 12
    first = post(disagg.http, long_prompt)
    assert first.headers["x-splitserve-prefill-worker"] != "local"
    time.sleep(1.5)
    # The same prompt again: decode now holds the blocks it received; only a short remainder
    # is uncached, so decode prefills locally and nothing moves.
    again = post(disagg.http, long_prompt)
    assert again.headers["x-splitserve-prefill-worker"] == "local"
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


AUDIT = ("audited_requests", "predicted_cached_tokens", "reported_cached_tokens",
         "matched_cached_tokens")


def audit_metrics(base: str) -> dict[str, float]:
    """The gateway's routing-audit series: counters without `_total`, mispredictions as
    `mispredictions:<direction>`, the gauges by name."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("splitserve_gateway_route_") and "_created" not in line:
            name, val = line.rsplit(" ", 1)
            name = name.removeprefix("splitserve_gateway_route_").replace("_total", "")
            out[name.replace('{direction="', ":").rstrip('"}')] = float(val)
    return out


def test_routing_audit_compares_the_prediction_with_the_engines_hit(
        aggregated: RunningCluster) -> None:
    """Predicted == reported when the index knows the prefix; a prefix the index holds for a
    worker whose engine does not (what an eviction whose BlockRemoved never reached Redis
    leaves, e.g. after a Redis failover) is an `over` misprediction; blocks the index lost
    while the engine kept them, an `under` one. The index's members are edited in Redis
    behind the workers' backs, as events the engines never sent (the engines' own KV events
    report real evictions: a small KV cache alone would not fool the index); they reach the
    gateway's replica by the index's change log, as the engines' do. The edits leave the
    worker's block count alone (the count of a batch goes out with the writer's next one),
    so the worker's updater, which audits it every 2 s, does not repair them."""
    async def redis_call(fn: Any) -> Any:
        client = redis_client(aggregated.redis_url)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    workers: list[WorkerInfo] = asyncio.run(redis_call(
        lambda c: WorkerRegistry(c).live_workers()))
    assert len(workers) == 2
    bs = workers[0].block_size
    hasher = BlockHasher(bs, workers[0].hash_algo, workers[0].hash_seed)
    rng = random.Random(16)

    def fresh(blocks: int) -> list[int]:  # token ids no earlier request used
        return [rng.randrange(5, 8192) for _ in range(blocks * bs + 5)]

    def edit(worker_id: str, hashes: list[int], add: bool) -> None:
        event = BlockStored(block_hashes=hashes) if add else BlockRemoved(block_hashes=hashes)
        asyncio.run(redis_call(lambda c: PrefixIndex(c).apply(worker_id, [event])))

    def replica_changes() -> float:
        """Index changes the gateway's replica has applied so far."""
        text = httpx.get(f"{aggregated.http}/metrics", timeout=10).text
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("splitserve_gateway_index_replica_changes_total "))

    def replica_follows(since: float, changes: int) -> None:
        """Until the gateway's replica has applied `changes` more index changes (the cluster
        is otherwise idle: they are the ones the test caused)."""
        deadline = time.monotonic() + 15
        while replica_changes() < since + changes:
            assert time.monotonic() < deadline, "the gateway's replica did not follow"
            time.sleep(0.05)

    def index_holds(worker_id: str, ids: list[int]) -> int:
        return asyncio.run(redis_call(lambda c: PrefixIndex(c).longest_prefixes(
            hasher.block_hashes(ids), [worker_id])))[worker_id]

    def block_count(worker_id: str) -> int:
        return asyncio.run(redis_call(lambda c: PrefixIndex(c).worker_block_count(worker_id)))

    def wait_indexed(worker_id: str, ids: list[int], blocks: int) -> None:
        deadline = time.monotonic() + 15
        while index_holds(worker_id, ids) < blocks:  # the engine's BlockStored, applied
            assert time.monotonic() < deadline, "the index never learnt the prompt"
            time.sleep(0.1)

    def audited(r: httpx.Response) -> tuple[int, int]:
        return (int(r.headers["x-splitserve-predicted-cached-tokens"]),
                int(r.headers["x-splitserve-reported-cached-tokens"]))

    # 1. The index knows the prefix: the prediction is the engine's hit, to the token.
    known = fresh(8)
    since = replica_changes()
    owner = post(aggregated.http, known, max_tokens=2).headers["x-splitserve-decode-worker"]
    wait_indexed(owner, known, 8)
    replica_follows(since, 8)
    before = audit_metrics(aggregated.http)
    r = post(aggregated.http, known + [7, 8, 9, 10, 11, 12, 13], max_tokens=2)
    assert r.headers["x-splitserve-decode-worker"] == owner, "did not follow the cache"
    assert audited(r) == (8 * bs, 8 * bs)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 8 * bs
    after = audit_metrics(aggregated.http)
    for name in AUDIT[1:]:
        assert after[name] - before[name] == 8 * bs, name
    assert after["audited_requests"] - before["audited_requests"] == 1
    assert (after["mispredictions:over"], after["mispredictions:under"]) == (
        before["mispredictions:over"], before["mispredictions:under"])

    # 2. Blocks the index holds for a worker whose engine does not: over-predicted.
    other = next(w.worker_id for w in workers if w.worker_id != owner)
    ghost = fresh(6)
    since = replica_changes()
    edit(other, hasher.block_hashes(ghost), add=True)
    assert index_holds(other, ghost) == 6
    replica_follows(since, 6)
    counted = block_count(other)
    r = post(aggregated.http, ghost, max_tokens=2)
    assert r.headers["x-splitserve-decode-worker"] == other, "did not follow the (false) cache"
    assert audited(r) == (6 * bs, 0)
    over = audit_metrics(aggregated.http)
    assert over["mispredictions:over"] == after["mispredictions:over"] + 1
    assert over["mispredictions:under"] == after["mispredictions:under"]
    assert over["predicted_cached_tokens"] - after["predicted_cached_tokens"] == 6 * bs
    assert over["reported_cached_tokens"] == after["reported_cached_tokens"]
    assert over["hit_precision"] < 1.0

    # The engine now stores the ghost blocks for real: they were in the index already, so its
    # block count stays behind the updater's mirror until the updater's audit (every 2 s)
    # rebuilds the worker's entries. Step 3 edits the index too: on this worker, that rebuild
    # would undo its edit, so it waits for the rebuild first.
    deadline = time.monotonic() + 15
    while block_count(other) < counted + 6:
        assert time.monotonic() < deadline, "the updater never counted the ghost blocks"
        time.sleep(0.1)

    # 3. The engine holds blocks the index lost: under-predicted.
    lost = fresh(8)
    since = replica_changes()
    holder = post(aggregated.http, lost, max_tokens=2).headers["x-splitserve-decode-worker"]
    wait_indexed(holder, lost, 8)
    edit(holder, hasher.block_hashes(lost)[3:], add=False)
    assert index_holds(holder, lost) == 3
    replica_follows(since, 8 + 5)
    under_before = audit_metrics(aggregated.http)
    r = post(aggregated.http, lost + [7, 8, 9], max_tokens=2)
    assert r.headers["x-splitserve-decode-worker"] == holder
    assert audited(r) == (3 * bs, 8 * bs)
    under = audit_metrics(aggregated.http)
    assert under["mispredictions:under"] == under_before["mispredictions:under"] + 1
    assert under["mispredictions:over"] == under_before["mispredictions:over"]
    assert under["hit_recall"] < 1.0
