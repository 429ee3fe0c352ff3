"""`up`'s private Redis failing under load, on a real cluster (2 aggregated workers, so the kv
policy has a choice and asks the prefix index for every request):

- `status` finds the cluster with no flags (the state file `up` writes);
- Redis SIGSTOPped for 30 s under load: every request answers 200, none waits more than a
  couple of seconds longer than before the stop; after SIGCONT the registry and routing by
  prefix are back by themselves;
- Redis SIGKILLed: `up` starts it again on its port, the workers register again, their index
  entries are rebuilt, routing by prefix resumes, no request fails;
- when `up` stops, its state file goes and `status` says no cluster runs.

Figures (latencies per phase) are printed and saved as JSON in the test's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
import redis

from tests.support.cluster import RunningCluster, start_test_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]
MODEL = "splitserve-tiny"
STOP_S = 30.0
CLIENTS = 4
# a long shared prefix: many KV blocks (32 tokens each) the index can find
PREFIX = " ".join(f"clause {i} of the operator's service level agreement;" for i in range(40))


@dataclass
class Outage:
    cluster: RunningCluster
    state_dir: Path
    out_dir: Path
    figures: dict = field(default_factory=dict)


def cli(state_dir: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ, SPLITSERVE_STATE_DIR=str(state_dir))
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Outage]:
    base = tmp_path_factory.mktemp("outage")
    state_dir = base / "state"
    mp = pytest.MonkeyPatch()
    mp.setenv("SPLITSERVE_STATE_DIR", str(state_dir))  # inherited by `up`
    try:
        cluster = start_test_cluster(["--mode", "aggregated", "--workers", "2"], base / "run")
    finally:
        mp.undo()
    o = Outage(cluster, state_dir, base)
    try:
        yield o
    finally:
        code = cluster.stop()
        leftovers = cluster.alive_descendants()
        if leftovers:
            cluster.kill()
        (base / "figures.json").write_text(json.dumps(o.figures, indent=2))
        print(json.dumps(o.figures, indent=2))
        assert code == 0, f"splitserve up exited {code}"
        assert not leftovers, f"processes survived the cluster: {leftovers}"
        assert not list((state_dir / "clusters").glob("*.json")), "state file left behind"
        out = cli(state_dir, "status")
        assert out.returncode == 2 and "no cluster" in out.stderr


def redis_proc(cluster: RunningCluster) -> psutil.Process:
    kids = psutil.Process(cluster.proc.pid).children(recursive=True)
    return next(p for p in kids if p.name() == "redis-server")


def live_workers(o: Outage) -> list[dict]:
    out = cli(o.state_dir, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def predicted_sum(cluster: RunningCluster) -> float:
    text = httpx.get(f"{cluster.http}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("splitserve_gateway_predicted_cached_blocks_sum"):
            return float(line.split()[-1])
    return 0.0


def routes_by_prefix(cluster: RunningCluster) -> bool:
    """A prompt seen before: the index predicts cached blocks for it (Redis serves it)."""
    prompt = PREFIX + " Summarise it."
    complete(cluster, prompt)
    before = predicted_sum(cluster)
    complete(cluster, prompt)
    return predicted_sum(cluster) - before >= 8


def complete(cluster: RunningCluster, prompt: str) -> httpx.Response:
    r = httpx.post(f"{cluster.http}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


class Load:
    """CLIENTS threads sending requests (a shared prefix, each its own tail) until stopped;
    every request's (start, seconds, status)."""

    def __init__(self, cluster: RunningCluster) -> None:
        self.cluster = cluster
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)

    def _run(self, client: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                start = time.monotonic()
                try:
                    r = http.post(f"{self.cluster.http}/v1/completions", json={
                        "model": MODEL, "prompt": f"{PREFIX} client {client} question {n}",
                        "max_tokens": 8, "temperature": 0})
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0
                self.samples.append((start, time.monotonic() - start, code))

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if t0 <= s[0] < t1]


def summary(samples: list[tuple[float, float, int]]) -> dict:
    secs = sorted(s[1] for s in samples)
    return {"requests": len(secs), "failed": sum(s[2] != 200 for s in samples),
            "p50_s": round(secs[len(secs) // 2], 3) if secs else None,
            "max_s": round(secs[-1], 3) if secs else None}


def test_status_finds_the_cluster_without_flags(outage: Outage) -> None:
    states = list((outage.state_dir / "clusters").glob("splitserve.*.json"))
    assert len(states) == 1
    state = json.loads(states[0].read_text())
    assert state["redis_url"] == outage.cluster.redis_url and state["private_redis"]
    assert state["http"] == outage.cluster.http and state["pid"] == outage.cluster.proc.pid
    assert len(live_workers(outage)) == 2


def test_the_private_redis_refuses_clients_without_its_password(outage: Outage) -> None:
    """`up`'s Redis needs the password derived from the cluster secret; the password is on no
    process's command line (which every user of the machine can read)."""
    from urllib.parse import urlparse

    url = urlparse(outage.cluster.redis_url)
    assert url.password, outage.cluster.redis_url
    anonymous = redis.Redis(host=url.hostname, port=url.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=url.hostname, port=url.port, password="guess", socket_timeout=5).ping()
    anonymous.close()
    assert redis.Redis.from_url(outage.cluster.redis_url, socket_timeout=5).ping()
    procs = psutil.Process(outage.cluster.proc.pid).children(recursive=True)
    assert any(p.name() == "redis-server" for p in procs)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            assert url.password not in " ".join(p.cmdline()), p.name()


def test_a_silent_redis_under_load_delays_no_request_and_fails_none(outage: Outage) -> None:
    cluster = outage.cluster
    assert routes_by_prefix(cluster)
    proc = redis_proc(cluster)
    with Load(cluster) as load:
        time.sleep(10)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(STOP_S)
        finally:
            proc.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        time.sleep(10)
    before = summary(load.between(0, t_stop))
    during = summary(load.between(t_stop, t_cont))
    after = summary(load.between(t_cont, float("inf")))
    outage.figures["sigstop"] = {"stop_s": STOP_S, "before": before, "during": during,
                                 "after": after}
    assert before["requests"] and during["requests"] and after["requests"]
    assert before["failed"] == during["failed"] == after["failed"] == 0, outage.figures
    # no request hangs on the silent Redis: at most ~1 s (one bounded lookup) more
    assert during["max_s"] <= before["max_s"] + 3.0, outage.figures
    # back by themselves: the registry, and routing by prefix
    deadline = time.monotonic() + 30
    while not routes_by_prefix(cluster):
        assert time.monotonic() < deadline, "routing by prefix did not resume after SIGCONT"
        time.sleep(1)
    assert len(live_workers(outage)) == 2


def test_a_killed_redis_is_restarted_and_routing_by_prefix_resumes(outage: Outage) -> None:
    cluster = outage.cluster
    old = redis_proc(cluster)
    with Load(cluster) as load:
        time.sleep(5)
        t_kill = time.monotonic()
        old.send_signal(signal.SIGKILL)
        client = redis.Redis.from_url(cluster.redis_url, socket_timeout=1,
                                      socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "up did not start its Redis again"
            time.sleep(0.2)
        restarted_after = time.monotonic() - t_kill
        client.close()
        deadline = time.monotonic() + 60
        while len(live_workers(outage)) != 2:
            assert time.monotonic() < deadline, "workers did not register again"
            time.sleep(0.5)
        registered_after = time.monotonic() - t_kill
        time.sleep(5)
    new = redis_proc(cluster)
    assert new.pid != old.pid
    deadline = time.monotonic() + 30
    while not routes_by_prefix(cluster):
        assert time.monotonic() < deadline, "routing by prefix did not resume"
        time.sleep(1)
    prefix_after = time.monotonic() - t_kill
    during = summary(load.between(t_kill, float("inf")))
    outage.figures["sigkill"] = {"redis_back_s": round(restarted_after, 2),
                                 "workers_registered_s": round(registered_after, 2),
                                 "prefix_routing_s": round(prefix_after, 2), "load": during}
    assert during["requests"] and during["failed"] == 0, outage.figures
