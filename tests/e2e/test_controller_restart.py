"""The control plane survives its own death (docs/fault-tolerance.md): `splitserve up` joined to
a real Ray head (`--ray-address`, as in the chart) creates detached workers; SIGKILLed while a
separate gateway streams requests through them, it takes no worker with it and no request
fails; the next `up` of the namespace adopts the live worker (same id, same engine process,
no new engine), keeps the desired size it finds in Redis over its own flag, and resumes
healing (a killed engine is replaced); stopped with --keep-workers-on-stop (as the chart runs
it) it leaves its workers serving for a third, which adopts them; stopped without, it stops
every worker. With the GCS's state in Redis (Ray's GCS fault tolerance, as the chart turns
it on), a SIGKILLed Ray head restarted on its port keeps a worker on another node alive and
serving throughout, and the restarted controller adopts it."""

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
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from services.cluster_secret import ClusterSecret
from services.controller.gateway_process import GatewayProcess
from services.gateway.config import GatewayConfig
from services.ports import free_port
from tests.support.cluster import RunningCluster, start_test_cluster
from tests.support.ray_head import (head_node, ray_env, ray_head, short_temp_dir,
                                    worker_node)
from tests.support.redis import redis_server

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

MODEL = "splitserve-tiny"


def live(redis_url: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                          "--redis-url", redis_url], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def wait_for(what: str, check, timeout_s: float = 300, every_s: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def engine_process(pid: int) -> psutil.Process:
    for c in psutil.Process(pid).children(recursive=True):
        if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline()):
            return c
    raise AssertionError(f"no engine process under {pid}")


def complete_once_routable(url: str, prompt: str, within_s: float = 30) -> None:
    """A completion that succeeds once the gateway's registry view has the worker (it
    re-reads the registry every 0.5 s: `status` can see a new worker first): a 503
    service_unavailable until then is retried, nothing else is."""
    deadline = time.monotonic() + within_s
    while True:
        got = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 8})
        if got.status_code == 200:
            return
        assert got.status_code == 503, got.text
        assert got.json()["error"]["type"] == "service_unavailable", got.text
        assert time.monotonic() < deadline, f"still no worker after {within_s}s: {got.text}"
        time.sleep(0.5)


class Load:
    """Streaming clients through the gateway until stopped; every request recorded."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url, self.clients = url, clients
        self.results: list[tuple[int, str, str]] = []  # status, finish reason, error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(300)

    async def _one(self, http: httpx.AsyncClient, k: int) -> None:
        status, finish, error = 0, "", ""
        try:
            async with http.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": f"request {k}: once upon a time",
                    "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                    "stream": True}) as resp:
                status = resp.status_code
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = json.dumps(chunk["error"])
                        for c in chunk.get("choices", []):
                            finish = c.get("finish_reason") or finish
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.results.append((status, finish, error))

    async def _client(self, http: httpx.AsyncClient, k: int) -> None:
        i = k
        while not self._stop.is_set():
            await self._one(http, i)
            i += self.clients

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as http:
            await asyncio.gather(*(self._client(http, k) for k in range(self.clients)))


def up(tmp_path: Path, name: str, address: str, redis_url: str, secret_file: Path,
       workers: int, *extra: str) -> RunningCluster:
    """`splitserve up` joined to the Ray at `address`, aggregated, no gateway of its own; its
    run directory short (the engine's IPC socket paths live there)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"ss{name[:2]}-", dir=os.path.realpath("/tmp")))
    (tmp_path / f"{name}.run_dir").write_text(str(run_dir))
    return start_test_cluster([
        "--ray-address", address, "--redis-url", redis_url, "--no-gateway",
        "--cluster-secret-file", str(secret_file), "--mode", "aggregated",
        "--workers", str(workers), "--worker-host", "127.0.0.1", *extra], run_dir / "run")


@pytest.fixture(autouse=True)
def _remove_run_dirs(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    for f in tmp_path.glob("*.run_dir"):
        shutil.rmtree(f.read_text(), ignore_errors=True)


def gateway(tmp_path: Path, model_dir: Path, redis_url: str, secret_file: Path
            ) -> GatewayProcess:
    return GatewayProcess(GatewayConfig(
        model=str(model_dir), served_model_name=MODEL, redis_url=redis_url,
        port=free_port(), metrics_port=free_port()), tmp_path, secret_file)


def test_workers_outlive_a_killed_controller_and_are_adopted(tmp_path: Path,
                                                             model_dir: Path) -> None:
    secret_file = ClusterSecret.generate().write(tmp_path / "cluster-secret")
    with redis_server() as rs, ray_head(tmp_path / "head.log", num_cpus=4) as address:
        def controller(name: str, workers: int, *extra: str) -> RunningCluster:
            return up(tmp_path, name, address, rs.url, secret_file, workers, *extra)

        first = controller("first", 1)
        second: RunningCluster | None = None
        third: RunningCluster | None = None
        gw = gateway(tmp_path, model_dir, rs.url, secret_file)
        try:
            [worker] = live(rs.url)
            engine = engine_process(worker["pid"])
            # the pool size as `splitserve scale` sets it (the size it runs: no engine starts)
            subprocess.run([sys.executable, "-m", "services.cli", "scale", "--workers", "1",
                            "--redis-url", rs.url], check=True, timeout=60)
            gw.start()
            gw.wait_ready(120)
            with Load(gw.url) as load:
                wait_for("requests before the kill", lambda: len(load.results) >= 2, 120)
                os.kill(first.proc.pid, signal.SIGKILL)
                first.proc.wait(30)
                done_at_kill = len(load.results)
                wait_for("requests after the kill",
                         lambda: len(load.results) >= done_at_kill + 4, 180)
            bad = [r for r in load.results if r[0] != 200 or r[2] or r[1] != "length"]
            assert not bad, f"{len(bad)} of {len(load.results)} requests failed: {bad[:3]}"

            # the worker outlived its controller: same process, same engine, still registered
            time.sleep(3)  # past several heartbeats
            assert [w["worker_id"] for w in live(rs.url)] == [worker["worker_id"]]
            assert engine.is_running(), "the engine died with the controller"

            # a new controller asked for 2 workers adopts the one alive and keeps the desired
            # size `scale` left in Redis (1): no new engine starts
            second = controller("second", 2, "--keep-workers-on-stop")
            log = second.log_path.read_text(errors="replace")
            assert f"adopted worker {worker['worker_id']} (serving)" in log, log[-3000:]
            assert "starting worker" not in log, log[-3000:]
            r = redis.Redis.from_url(rs.url, decode_responses=True)
            try:
                assert r.hget("splitserve:pools:desired", "both") == "1"
                observed = wait_for("observed sizes", lambda: (
                    r.hgetall("splitserve:pools:observed")
                    if r.hget("splitserve:pools:observed", "both") == "1" else None), 60)
                assert observed["both.restarts"] == "0", observed
            finally:
                r.close()
            assert [w["worker_id"] for w in live(rs.url)] == [worker["worker_id"]]
            assert engine.is_running()

            # it health-checks what it adopted: a dead engine is replaced by a new worker
            engine.kill()
            replacement = wait_for("a replacement worker", lambda: [
                w for w in live(rs.url) if w["worker_id"] != worker["worker_id"]], 400, 1.0)
            assert len(replacement) == 1, replacement
            complete_once_routable(gw.url, "after the replacement")
            new_pid = replacement[0]["pid"]

            # stopped with --keep-workers-on-stop: its worker keeps serving, sizes kept
            assert second.stop() == 0
            assert [w["worker_id"] for w in live(rs.url)] == [replacement[0]["worker_id"]]
            r = redis.Redis.from_url(rs.url, decode_responses=True)
            try:
                assert r.hget("splitserve:pools:desired", "both") == "1"
            finally:
                r.close()
            complete_once_routable(gw.url, "between controllers")
            third = controller("third", 1)
            log = third.log_path.read_text(errors="replace")
            assert f"adopted worker {replacement[0]['worker_id']} (serving)" in log, log[-3000:]
        finally:
            gw.stop()
            codes = [c.stop() for c in (third,) if c is not None]
            for c in (first, second):
                if c is not None and c.proc.poll() is None:
                    c.kill()
        # stopped without it, the controller stops every worker, detached ones included
        assert codes == [0], codes
        assert live(rs.url) == []
        wait_for("the replacement worker's process to end",
                 lambda: not psutil.pid_exists(new_pid), 30)
        assert not psutil.pid_exists(worker["pid"])


def test_a_head_restart_keeps_workers_with_the_gcs_state_in_redis(tmp_path: Path,
                                                                   model_dir: Path) -> None:
    secret_file = ClusterSecret.generate().write(tmp_path / "cluster-secret")
    temp = short_temp_dir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    with redis_server() as rs, redis_server() as gcs_store:
        # the head as the chart runs it: no engine on it, its GCS state in a Redis of its own
        head_env = ray_env(RAY_AUTH_MODE="disabled",
                           RAY_REDIS_ADDRESS=f"127.0.0.1:{gcs_store.port}",
                           RAY_external_storage_namespace="splitserve-test")
        head = head_node(tmp_path / "head.log", port, temp / "ray", num_cpus=0, env=head_env)
        # a worker node (a worker pod) that waits for a lost GCS instead of exiting
        node = worker_node(tmp_path / "node.log", address, num_cpus=4, resources='{"both": 1}',
                           env=ray_env(RAY_AUTH_MODE="disabled",
                                       RAY_gcs_rpc_server_reconnect_timeout_s="120"))
        first = second = None
        gw = gateway(tmp_path, model_dir, rs.url, secret_file)
        try:
            head.start(wait_port=port)
            node.start()
            first = up(tmp_path, "first", address, rs.url, secret_file, 1,
                       "--workers-resources", '{"both": 1}')
            [worker] = live(rs.url)
            engine = engine_process(worker["pid"])
            assert worker["pid"] in {p.pid for p in node.processes()}, (
                "the worker is not on the worker node")
            gw.start()
            gw.wait_ready(120)
            with Load(gw.url) as load:
                wait_for("requests before the crash", lambda: len(load.results) >= 2, 120)
                head.kill()  # GCS, head raylet and all, at once
                os.kill(first.proc.pid, signal.SIGKILL)  # its controller goes with it
                first.proc.wait(30)
                done_at_crash = len(load.results)
                # the engine serves on while Ray's head is away
                wait_for("requests while the head is down",
                         lambda: len(load.results) >= done_at_crash + 3, 120)
            # same port, same GCS store (another temp dir: `ray start` takes the worker node's
            # processes, which name the GCS address, for a head still running); the load is
            # off meanwhile (2 cores: a busy engine starves the head's start-up)
            head = head_node(tmp_path / "head.log", port, temp / "ray2", num_cpus=0,
                             env=head_env)
            head.start(wait_port=port)
            second = up(tmp_path, "second", address, rs.url, secret_file, 1,
                        "--workers-resources", '{"both": 1}')
            with Load(gw.url) as after:
                wait_for("requests after the adoption", lambda: len(after.results) >= 2, 120)
            load.results += after.results
            bad = [r for r in load.results if r[0] != 200 or r[2] or r[1] != "length"]
            assert not bad, f"{len(bad)} of {len(load.results)} requests failed: {bad[:3]}"
            log = second.log_path.read_text(errors="replace")
            assert f"adopted worker {worker['worker_id']} (serving)" in log, log[-3000:]
            assert "starting worker" not in log, log[-3000:]
            assert engine.is_running(), "the engine did not survive the head's restart"
            assert [w["worker_id"] for w in live(rs.url)] == [worker["worker_id"]]
            assert second.stop() == 0
            assert live(rs.url) == []
            wait_for("the worker's process to end",
                     lambda: not psutil.pid_exists(worker["pid"]), 30)
        finally:
            gw.stop()
            for c in (first, second):
                if c is not None and c.proc.poll() is None:
                    c.kill()
            node.stop()
            head.stop()
            shutil.rmtree(temp, ignore_errors=True)
