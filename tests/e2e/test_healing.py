"""Pools that heal, on a real cluster: KV lease expiry, a hung prefill worker, a Redis restart,
scaling with drain, and a chaos run that kills engines and actors of both pools under load.

One cluster (1 prefill + 2 decode workers, built-in tiny model) on a Redis the test owns, so
the test can stop and restart it. Outputs are greedy and compared with reference outputs the
same cluster produced before anything was broken.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
import redis

from services.controller.redis_server import RedisServer
from services.worker.shm import segments_mapped_by_children
from tests.support.cluster import RunningCluster, cluster_secret, start_test_cluster
from tests.support.engine_link import EngineLinks

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]
MODEL = "splitserve-tiny"
LEASE_S = 9  # accept window: 9 * 2/3 - 1 = 5 s
PROMPTS = [
    "Operators trust a serving cluster when killing any part of it loses no request at all",
    "def migrate(request, tokens):\n    \"\"\"Continue a request on another worker.\"\"\"\n",
    "The prefill pool computes prompts; the decode pool streams tokens to every client",
    "A chaos test kills engines and actors while a steady stream of requests keeps going",
]
LONG_TOKENS = 160


@dataclass
class Healing:
    cluster: RunningCluster
    redis: RedisServer
    redis_dir: Path
    reference: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def healing(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Healing]:
    redis_dir = Path(tempfile.mkdtemp(prefix="splitserve-heal-redis-"))
    h = Healing(cluster=None, redis=RedisServer(redis_dir), redis_dir=redis_dir)  # type: ignore[arg-type]
    h.redis.start()
    try:
        run_dir = tmp_path_factory.mktemp("heal") / "run"
        h.cluster = start_test_cluster(
            ["--mode", "disaggregated", "--prefill", "1", "--decode", "2",
             "--redis-url", h.redis.url, "--kv-lease-s", str(LEASE_S),
             "--prefill-timeout-s", "3", "--route-headers"], run_dir)
    except BaseException:
        h.redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
        raise
    cluster = h.cluster
    try:
        for p in PROMPTS:
            h.reference[p] = complete(cluster, p)
            assert complete(cluster, p) == h.reference[p], "greedy output is not reproducible"
        yield h
    finally:
        cluster.snapshot_descendants()
        # One worker is frozen (SIGSTOP) when the cluster stops: it cannot stop itself, so the
        # controller must kill it by PID and remove what it published.
        frozen = None
        try:
            frozen = next(w for w in live(h) if w["role"] == "decode")
            os.kill(frozen["pid"], signal.SIGSTOP)
        except Exception:
            pass
        code = cluster.stop()
        leftovers = cluster.alive_descendants()
        if leftovers:
            cluster.kill()
        client = redis.Redis.from_url(h.redis.url)
        published = client.keys("splitserve:worker:*") + client.keys("splitserve:kv:n:*")
        client.close()
        h.redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
        assert code == 0, f"splitserve up exited {code}"
        assert not leftovers, f"processes survived the cluster: {leftovers}"
        assert not cluster.leaked_segments(), "shared memory left behind"
        assert frozen is not None, "no decode worker to freeze"
        assert not published, f"stopped workers left registry/index entries: {published}"


# --- helpers ------------------------------------------------------------------------------------

def complete(cluster: RunningCluster, prompt: str, max_tokens: int = LONG_TOKENS,
             ignore_eos: bool = True) -> str:
    r = httpx.post(f"{cluster.http}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": ignore_eos})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def live(h: Healing) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                          "--redis-url", h.redis.url], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def wait_pools(h: Healing, want: dict[str, int], timeout_s: float = 400) -> list[dict]:
    """Until the controller reports exactly `want` serving (none starting or draining) and
    the registry lists those workers."""
    r = redis.Redis.from_url(h.redis.url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    seen: dict = {}
    try:
        while time.monotonic() < deadline:
            seen = r.hgetall("splitserve:pools:observed")
            ok = all(seen.get(p) == str(n) and seen.get(f"{p}.starting") == "0"
                     and seen.get(f"{p}.draining") == "0" for p, n in want.items())
            if ok:
                ws = live(h)
                if all(sum(w["role"] == p for w in ws) == n for p, n in want.items()):
                    return ws
            time.sleep(0.5)
    finally:
        r.close()
    raise AssertionError(f"pools did not reach {want}: {seen}")


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url, timeout=10).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total, found = 0.0, False
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"metric {name}{labels} not found at {url}"
    return total


def engine_process(worker: dict) -> psutil.Process:
    """The vLLM engine-core process of a worker (a child of its actor process)."""
    for c in psutil.Process(worker["pid"]).children(recursive=True):
        try:
            if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline()):
                return c
        except psutil.Error:
            continue
    raise AssertionError(f"no engine process under {worker['pid']}")


class Traffic:
    """Concurrent streaming clients sending greedy requests until stopped; records every
    request's status and text."""

    def __init__(self, h: Healing, clients: int = 3) -> None:
        self.h = h
        self.clients = clients
        self.results: list[tuple[str, int, str, str]] = []  # prompt, status, text, error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(600)

    async def _one(self, http: httpx.AsyncClient, prompt: str) -> None:
        text, status, error = "", 0, ""
        try:
            async with http.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": prompt, "max_tokens": LONG_TOKENS,
                    "temperature": 0, "ignore_eos": True, "stream": True}) as resp:
                status = resp.status_code
                if status != 200:
                    error = (await resp.aread()).decode(errors="replace")
                else:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = json.dumps(chunk["error"])
                        for c in chunk.get("choices", []):
                            text += c.get("text") or ""
        except Exception as exc:  # a broken stream is a failure, recorded as such
            error = f"{type(exc).__name__}: {exc}"
        self.results.append((prompt, status, text, error))

    async def _client(self, http: httpx.AsyncClient, k: int) -> None:
        i = k
        while not self._stop.is_set():
            await self._one(http, PROMPTS[i % len(PROMPTS)])
            i += 1

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.h.cluster.http, timeout=600) as http:
            await asyncio.gather(*(self._client(http, k) for k in range(self.clients)))

    def check(self, minimum: int) -> None:
        assert len(self.results) >= minimum, f"only {len(self.results)} requests ran"
        bad = [(p[:30], s, e) for p, s, t, e in self.results if s != 200 or e]
        assert not bad, f"failed requests: {bad[:5]} ({len(bad)} of {len(self.results)})"
        wrong = [(p, t) for p, s, t, e in self.results if t != self.h.reference[p]]
        assert not wrong, (f"{len(wrong)} of {len(self.results)} outputs differ from the "
                           f"reference; first: {divergence(self.h.reference[wrong[0][0]], wrong[0][1])}")


def divergence(want: str, got: str) -> str:
    """Where two texts part, with some context."""
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return (f"at char {i} of {len(want)}: want {want[max(0, i - 20):i + 40]!r}, "
            f"got {got[max(0, i - 20):i + 40]!r} (got {len(got)} chars)")


def gateway_metric(h: Healing, name: str) -> float:
    return metric(f"{h.cluster.http}/metrics", name)


# --- tests --------------------------------------------------------------------------------------

BASE = {"prefill": 1, "decode": 2}


@pytest.fixture(autouse=True)
def base_sizes(healing: Healing) -> None:
    """Each test starts on the base pool sizes, whatever the test before it left (a failed
    test must not fail the ones after it)."""
    r = redis.Redis.from_url(healing.redis.url, decode_responses=True)
    try:
        desired = {k: int(v) for k, v in r.hgetall("splitserve:pools:desired").items()}
    except redis.RedisError:
        desired = {}
    finally:
        r.close()
    if desired and desired != BASE:
        _scale(healing, **BASE)


def test_expired_kv_lease_is_recomputed_not_read(healing: Healing) -> None:
    """A decode that arrives after the prefill worker's lease window computes the prompt
    itself (its KV transfer parameters are refused as expired), with the right output."""
    ws = wait_pools(healing, {"prefill": 1, "decode": 2})
    prefill = next(w for w in ws if w["role"] == "prefill")
    decode = next(w for w in ws if w["role"] == "decode")
    prompt_ids = list(range(5, 5 + 96))  # 3 blocks, not cached anywhere yet
    src = "vllm:prompt_tokens_by_source_total"

    async def run(delay_s: float, rid: str) -> list[int]:
        async with EngineLinks(cluster_secret(healing.cluster)) as links:
            kv, _ = await links.prefill(prefill, rid, prompt_ids)
            await asyncio.sleep(delay_s)
            return await links.generate(decode, rid, prompt_ids, 12, kv, ignore_eos=True)

    expired = metric(decode["metrics_url"], "splitserve_worker_kv_params_refused_total",
                     reason="expired")
    before = (metric(decode["metrics_url"], src, source="external_kv_transfer"),
              metric(decode["metrics_url"], src, source="local_compute"))
    late = asyncio.run(run(LEASE_S * 2 / 3 - 1 + 1.0, "lease-late"))
    time.sleep(2)  # counters update at the engine's next stats tick
    after = (metric(decode["metrics_url"], src, source="external_kv_transfer"),
             metric(decode["metrics_url"], src, source="local_compute"))
    assert after[0] - before[0] == 0, "decode read KV after the lease window"
    assert after[1] - before[1] == len(prompt_ids), "decode did not compute the prompt"
    assert metric(decode["metrics_url"], "splitserve_worker_kv_params_refused_total",
                  reason="expired") == expired + 1
    # the same prompt pulled in time gives the same tokens
    in_time = asyncio.run(run(0.0, "lease-in-time"))
    assert late == in_time and len(late) == 12
    # and the prefill worker holds no blocks for either
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        p = next(w for w in live(healing) if w["worker_id"] == prefill["worker_id"])
        if p["load"]["kv_cache_usage"] == 0:
            break
        time.sleep(0.5)
    assert p["load"]["kv_cache_usage"] == 0, "the prefill worker still holds KV blocks"


def transformers_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """The ground truth: transformers' greedy generate on the same model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        seq = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return tok.decode(seq[0, len(ids):], skip_special_tokens=True)


def test_hung_prefill_worker_falls_back_to_decode_prefill(healing: Healing,
                                                          model_dir: Path) -> None:
    """A prefill worker that does not answer (its engine stopped) costs a request only the
    prefill timeout: the decode worker computes the prompt, the output is right."""
    ws = wait_pools(healing, {"prefill": 1, "decode": 2})
    prefill = next(w for w in ws if w["role"] == "prefill")
    engine = engine_process(prefill)
    before = gateway_metric(healing, "splitserve_gateway_prefill_fallbacks_total")
    # new to every worker, longer than the kv policy's local-prefill threshold
    prompt = "A hung prefill worker must not hang the request: " + PROMPTS[2] * 8
    expected = transformers_greedy(model_dir, prompt, 24)
    engine.suspend()
    try:
        started = time.monotonic()
        got = complete(healing.cluster, prompt, 24, ignore_eos=False)
        took = time.monotonic() - started
    finally:
        engine.resume()
    assert got == expected
    assert gateway_metric(healing, "splitserve_gateway_prefill_fallbacks_total") > before
    assert took >= 3, "the prefill timeout (3 s) was not waited for: no prefill was tried"


def test_redis_restart_keeps_requests_flowing_and_rebuilds_state(healing: Healing) -> None:
    ws = wait_pools(healing, {"prefill": 1, "decode": 2})
    r = redis.Redis.from_url(healing.redis.url, decode_responses=True)
    held_before = {w["worker_id"]: int(r.get(f"splitserve:kv:n:{{{w['worker_id']}}}") or 0)
                   for w in ws}
    r.close()
    assert any(held_before.values()), "no worker had indexed blocks to lose"
    port = healing.redis.port
    healing.redis.stop()
    try:
        for p in PROMPTS[:2]:  # routed on the gateway's last registry snapshot
            assert complete(healing.cluster, p) == healing.reference[p]
    finally:
        healing.redis = RedisServer(healing.redis_dir, port=port)
        healing.redis.start()
    r = redis.Redis.from_url(healing.redis.url, decode_responses=True)
    try:
        # the workers register again, the controller restores the desired sizes, every worker
        # writes its cached blocks back into the index
        assert {w["worker_id"] for w in wait_pools(healing, {"prefill": 1, "decode": 2})} == \
            {w["worker_id"] for w in ws}
        assert r.hgetall("splitserve:pools:desired") == {"prefill": "1", "decode": "2"}
        def rebuilt() -> bool:
            return all(held[w] >= n for w, n in held_before.items())

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            held = {w["worker_id"]: int(r.get(f"splitserve:kv:n:{{{w['worker_id']}}}") or 0)
                    for w in ws}
            if rebuilt():
                break
            time.sleep(0.5)
        assert rebuilt(), f"index not rebuilt: before {held_before}, now {held}"
    finally:
        r.close()
    for p in PROMPTS[2:]:
        assert complete(healing.cluster, p) == healing.reference[p]


def _scale(h: Healing, **sizes: int) -> None:
    args = [f"--{k}={v}" for k, v in sizes.items()]
    out = subprocess.run([sys.executable, "-m", "services.cli", "scale", *args, "--redis-url",
                          h.redis.url, "--wait", "400"], capture_output=True, text=True,
                         timeout=450)
    assert out.returncode == 0, out.stderr


def _streams_on(h: Healing, workers: list[dict], max_tokens: int
                ) -> tuple[threading.Thread, list]:
    """One long greedy stream straight to each worker's engine link (so every worker has a
    request in flight whatever the router would choose); the token counts each got."""
    got: list = []

    async def one(links: EngineLinks, w: dict, k: int) -> int:
        ids = await links.generate(w, f"drain-{k}", list(range(7 + k, 40 + k)), max_tokens,
                                   ignore_eos=True)
        return len(ids)

    async def all_() -> None:
        async with EngineLinks(cluster_secret(h.cluster)) as links:
            got.extend(await asyncio.gather(*(one(links, w, k) for k, w in enumerate(workers)),
                                            return_exceptions=True))

    t = threading.Thread(target=lambda: asyncio.run(all_()), daemon=True)
    t.start()
    return t, got


def test_scale_up_and_drain_down_under_load(healing: Healing) -> None:
    """`splitserve scale` grows the decode pool and shrinks it again while requests stream:
    the drained workers finish what they have and leave the registry; nothing is lost."""
    before = {w["worker_id"] for w in wait_pools(healing, {"prefill": 1, "decode": 2})}
    drain_tokens = 1500
    with Traffic(healing, clients=4) as traffic:
        _scale(healing, decode=3)
        ws = wait_pools(healing, {"prefill": 1, "decode": 3})
        grown = {w["worker_id"] for w in ws}
        assert before < grown
        time.sleep(3)  # the new worker takes traffic
        # every decode worker has a long request in flight when the pool shrinks, so the
        # drained ones have requests to finish whichever the controller picks
        streams, got = _streams_on(healing, [w for w in ws if w["role"] == "decode"],
                                   drain_tokens)
        deadline = time.monotonic() + 60
        while not all(w["load"]["in_flight"] > 0 for w in live(healing) if w["role"] == "decode"):
            assert time.monotonic() < deadline, "the direct streams never started"
            time.sleep(0.2)
        _scale(healing, decode=1)
        shrunk = wait_pools(healing, {"prefill": 1, "decode": 1})
        streams.join(300)
    traffic.check(minimum=4)
    assert got == [drain_tokens] * 3, f"streams on draining workers were cut: {got}"
    assert {w["worker_id"] for w in shrunk} < grown
    log = (healing.cluster.log_path).read_text(errors="replace")
    assert log.count("drained: {") >= 2, "workers were stopped without draining"
    drains = [line for line in log.splitlines() if "drained: {" in line]
    assert not [d for d in drains if "'unfinished': 0" not in d], drains
    assert any("'in_flight_at_start': 0" not in d for d in drains), \
        f"no drained worker had requests to finish: the test did not test drain: {drains}"


def test_planner_desired_sizes_reach_the_controller(healing: Healing) -> None:
    """The SLA planner's desired sizes (here: its lower bound for prefill) reach the running
    controller through Redis and the pool grows; scaling back goes through drain."""
    from redis.asyncio import Redis

    from services.planner.config import PlannerConfig, PoolLimits
    from services.planner.planner import Planner

    wait_pools(healing, {"prefill": 1, "decode": 2})
    cfg = PlannerConfig(redis_url=healing.redis.url,
                        prefill=PoolLimits(min_replicas=2, max_replicas=2),
                        decode=PoolLimits(min_replicas=2, max_replicas=2))

    async def plan() -> dict:
        redis = Redis.from_url(healing.redis.url)
        planner = Planner(cfg, redis)
        try:
            report = await planner.step()
            assert not report.errors, report.errors
            return dict(report.desired_written)
        finally:
            await planner.aclose()
            await redis.aclose()

    written = asyncio.run(plan())
    assert written.get("prefill") == 2, written
    ws = wait_pools(healing, {"prefill": 2, "decode": 2})
    assert sum(w["role"] == "prefill" for w in ws) == 2
    _scale(healing, prefill=1)
    wait_pools(healing, {"prefill": 1, "decode": 2})


def test_chaos_kill_engines_and_actors_of_both_pools(healing: Healing) -> None:
    """Steady streaming load while engine processes and actor processes of both pools are
    SIGKILLed, one of each pool at the same moment, twice: every request completes with the
    reference output, no 5xx, and the pools return to their desired sizes after every kill."""
    want = {"prefill": 1, "decode": 2}
    wait_pools(healing, want)
    migrations = gateway_metric(healing, "splitserve_gateway_request_migrations_total")
    # each pool loses its engine once and its actor once; the two pools heal at once
    kills = [[("decode", "engine"), ("prefill", "actor")],
             [("decode", "actor"), ("prefill", "engine")]]
    killed: list[str] = []
    with Traffic(healing, clients=3) as traffic:
        for pair in kills:
            time.sleep(4)  # requests in flight on every worker
            ws = wait_pools(healing, want)
            victims = []
            for role, what in pair:
                victim = max((w for w in ws if w["role"] == role),
                             key=lambda w: w["load"]["in_flight"])
                target = (engine_process(victim) if what == "engine"
                          else psutil.Process(victim["pid"]))
                mapped = segments_mapped_by_children(victim["pid"])  # its engine's /dev/shm
                assert any(p.name.startswith("psm_") for p in mapped), mapped
                victims.append((victim, what, target, mapped))
            for victim, _, target, _ in victims:
                os.kill(target.pid, signal.SIGKILL)
                killed.append(victim["worker_id"])
            deadline = time.monotonic() + 60
            gone = {v["worker_id"] for v, _, _, _ in victims}
            while gone & {w["worker_id"] for w in live(healing)}:
                assert time.monotonic() < deadline, f"{gone} never left"
                time.sleep(0.5)
            wait_pools(healing, want)
            for victim, what, _, mapped in victims:
                left = [p for p in mapped if p.exists()]
                assert not left, f"{victim['worker_id']} ({what} killed) left {left}"
        time.sleep(3)
    traffic.check(minimum=8)
    final = wait_pools(healing, want)
    assert not {w["worker_id"] for w in final} & set(killed)
    assert gateway_metric(healing, "splitserve_gateway_request_migrations_total") > migrations, \
        "no request was in flight on a killed decode worker: the test did not test migration"
    # the replacements move KV between each other: decode engines handshake with the new
    # prefill worker (its NIXL agent is new; the killed ones' are gone)
    prompt = "After the chaos the new prefill worker computes this prompt. " * 8
    src = "vllm:prompt_tokens_by_source_total"
    before = {w["worker_id"]: metric(w["metrics_url"], src, source="external_kv_transfer")
              for w in final if w["role"] == "decode"}
    resp = httpx.post(f"{healing.cluster.http}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    pre, dec = (resp.headers["x-splitserve-prefill-worker"],
                resp.headers["x-splitserve-decode-worker"])
    assert pre not in killed and dec not in killed
    decode_url = next(w["metrics_url"] for w in final if w["worker_id"] == dec)
    n = resp.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 10
    while (moved := metric(decode_url, src, source="external_kv_transfer") - before[dec]) < n \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert moved == n, f"decode {dec} got {moved} of {n} prompt tokens by KV transfer"
    r = redis.Redis.from_url(healing.redis.url, decode_responses=True)
    try:
        observed = r.hgetall("splitserve:pools:observed")
        assert int(observed["decode.restarts"]) >= 2 and int(observed["prefill.restarts"]) >= 2
        for wid in killed:  # gone from the registry and from the prefix index
            assert not r.exists(f"splitserve:worker:{wid}")
            assert not r.exists(f"splitserve:kv:n:{{{wid}}}")
    finally:
        r.close()
