"""Observability on a whole disaggregated cluster: one request id through the gateway's and both
workers' logs, the KV transfer metric against the bytes the prompt needs, and every metric that
docs/metrics.md lists present on the endpoints it names."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from services.controller.pool_sizes import PoolSizes
from tests.e2e.test_data_path import workers
from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e
MODEL = "splitserve-tiny"
DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
BLOCK_SIZE = 32  # `splitserve up` default (--block-size)


def scrape(url: str) -> dict[str, object]:
    """Metric families by name (counters without `_total`, as the parser gives them)."""
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url, timeout=10).text)}


def sample(url: str, name: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not at {url}")


def kv_block_bytes(model_dir: Path) -> int:
    """Bytes of one KV block: K and V, every layer, every KV head (float32)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "float32"
    return 2 * cfg["num_hidden_layers"] * BLOCK_SIZE * cfg["num_key_value_heads"] * head_dim * 4


def worker_logs(run_dir: Path) -> list[Path]:
    """Ray worker processes' stderr files (session_latest is a link to the session: skipped)."""
    return sorted({p.resolve() for p in run_dir.glob("ray/session_*/logs/worker-*.err")})


def test_request_id_in_all_logs_and_kv_bytes_in_metrics(disagg: RunningCluster,
                                                        model_dir: Path) -> None:
    by_role = {w["role"]: w for w in workers(disagg)}
    decode_metrics = by_role["decode"]["metrics_url"]
    before = sample(decode_metrics, "splitserve_worker_kv_transfer_bytes_sum")
    before_count = sample(decode_metrics, "splitserve_worker_kv_transfer_bytes_count")

    rid = f"obs-{uuid.uuid4().hex}"
    # A prompt no engine has seen (its first block is unique), long enough that the router
    # moves its KV rather than letting decode compute it.
    prompt = f"{rid} " + " ".join(f"observability line {i} of the test" for i in range(40))
    r = httpx.post(f"{disagg.http}/v1/completions", timeout=120, headers={"x-request-id": rid},
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid
    assert r.headers["x-splitserve-prefill-worker"] == by_role["prefill"]["worker_id"]
    prompt_tokens = r.json()["usage"]["prompt_tokens"]

    want = math.ceil(prompt_tokens / BLOCK_SIZE) * kv_block_bytes(model_dir)
    deadline = time.monotonic() + 10
    while (grown := sample(decode_metrics, "splitserve_worker_kv_transfer_bytes_sum") - before
           ) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert grown == want, f"{prompt_tokens} prompt tokens moved {grown} bytes, want {want}"
    assert sample(decode_metrics, "splitserve_worker_kv_transfer_bytes_count") > before_count
    assert sample(by_role["prefill"]["metrics_url"],
                  "splitserve_worker_kv_transfer_bytes_count") == 0

    # A bad id is refused in OpenAI's error shape.
    bad = httpx.post(f"{disagg.http}/v1/completions", timeout=30,
                     headers={"x-request-id": "no spaces allowed"},
                     json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-id"

    gateway_log = disagg.run_dir / "gateway.log"
    lines: dict[str, list[str]] = {}
    while time.monotonic() < deadline + 10:
        lines = {"gateway": [ln for ln in gateway_log.read_text().splitlines() if rid in ln]}
        for path in worker_logs(disagg.run_dir):
            for ln in path.read_text(errors="replace").splitlines():
                if rid in ln:
                    lines.setdefault(str(path), []).append(ln)
        if len(lines) >= 3:
            break
        time.sleep(0.5)
    assert any("POST /v1/completions 200" in ln for ln in lines["gateway"]), lines
    worker_lines = [ln for k, v in lines.items() if k != "gateway" for ln in v]
    prefill_id, decode_id = by_role["prefill"]["worker_id"], by_role["decode"]["worker_id"]
    assert any(re.search(r"\bprefill cmpl-\S+: \d+ prompt tokens", ln) for ln in worker_lines)
    assert any("KV from a prefill worker" in ln for ln in worker_lines), worker_lines
    # Two different worker processes (each Ray actor logs to its own file).
    assert len(lines) - 1 == 2, lines
    assert prefill_id != decode_id


def documented_metrics() -> dict[str, list[tuple[str, str, list[str]]]]:
    """docs/metrics.md's tables: section -> [(name, type, labels)]."""
    out: dict[str, list[tuple[str, str, list[str]]]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        m = re.match(r"\| `([a-z_:]+)` \|\s*(counter|gauge|histogram)\s*\|[^|]*\|([^|]*)\|",
                     line)
        if m:
            labels = re.findall(r"`([a-z_]+)`", m[3])
            out.setdefault(section, []).append((m[1], m[2], labels))
    return out


def test_documented_metrics_exist(disagg: RunningCluster) -> None:
    doc = documented_metrics()
    assert set(doc) == {"Gateway", "Gateway, with its local replicas on",
                        "Worker (splitserve's own)", "Worker (vLLM's, per engine)"}
    # this cluster's gateway runs no replica: test_kv_routing's second gateway checks those
    del doc["Gateway, with its local replicas on"]
    assert sum(len(v) for v in doc.values()) >= 35
    # Some traffic first, so that labelled families have samples.
    r = httpx.post(f"{disagg.http}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "metrics " * 80, "max_tokens": 3, "temperature": 0,
        "stream": True})
    assert r.status_code == 200

    pool_sizes = asyncio.run(_pool_sizes(disagg.redis_url))
    gateway = scrape(f"{disagg.http}/metrics")
    endpoints = {"Gateway": [gateway]}
    worker_families = [scrape(w["metrics_url"]) for w in workers(disagg)]
    endpoints["Worker (splitserve's own)"] = worker_families
    endpoints["Worker (vLLM's, per engine)"] = worker_families
    missing = []
    for section, metrics in doc.items():
        for name, mtype, labels in metrics:
            for families in endpoints[section]:
                fam = families.get(name)
                if fam is None or fam.type != mtype:
                    missing.append(f"{section}: {name} ({mtype})")
                    continue
                if name.startswith("splitserve_pool_"):
                    _check_pool_family(fam, pool_sizes)
                    continue
                assert fam.samples, f"{name} has no samples"
                for s in fam.samples:
                    if not s.name.endswith(("_created", "_bucket")):
                        assert set(labels) <= set(s.labels), (name, labels, s.labels)
    assert not missing, missing


async def _pool_sizes(redis_url: str) -> tuple[dict, dict]:
    redis = Redis.from_url(redis_url)
    try:
        sizes = PoolSizes(redis, "splitserve")
        observed, _ = await sizes.observed()
        return await sizes.desired(), {p: o.serving for p, o in observed.items()}
    finally:
        await redis.aclose()


def _check_pool_family(fam: object, pool_sizes: tuple[dict, dict]) -> None:
    """Pool gauges mirror what the controller published in Redis (none: no samples)."""
    desired, serving = pool_sizes
    values = {s.labels.get("pool"): s.value for s in fam.samples  # type: ignore[attr-defined]
              if not s.name.endswith("_created")}
    if fam.name == "splitserve_pool_desired_replicas":  # type: ignore[attr-defined]
        assert values == {p: float(n) for p, n in desired.items()}
    elif fam.name == "splitserve_pool_serving_replicas":  # type: ignore[attr-defined]
        assert values == {p: float(n) for p, n in serving.items()}
