"""Ray's token authentication as the Helm chart turns it on (RAY_AUTH_MODE=token, the token in
a file named by RAY_AUTH_TOKEN_PATH; docs/security.md): a real local Ray head refuses a client
without the token or with another one, and lets one with the token connect. The refusals go
through `ray health-check`, what KubeRay's wait-gcs-ready init container runs before a worker
pod's `ray start`; the connection through `ray.init(address=...)`, what the controller runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from services.ports import free_port
from services.processes import kill_survivors

RAY = str(Path(sys.executable).parent / "ray")
TOKEN = "splitserve-test-ray-token-0123456789abcdef"
CONNECT = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, "
           "_node_ip_address='127.0.0.1'); print('CPUs', ray.cluster_resources()['CPU']); "
           "ray.shutdown()")


def _client_env(**auth: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env | auth


@pytest.fixture
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`ray start --head --block` with token authentication, on 127.0.0.1 and free ports;
    stopped by the PIDs of its process tree."""
    d = Path(os.path.realpath("/tmp")) / f"sstok-{os.getpid()}"  # Ray's socket paths: short
    d.mkdir(exist_ok=True)
    token = d / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    port = free_port()
    ports = {f"--{name}": str(free_port()) for name in (
        "node-manager-port", "object-manager-port", "ray-client-server-port",
        "min-worker-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port", "metrics-export-port")}
    argv = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={d}/ray",
            "--max-worker-port=0", "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items())]
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    env = _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", token
    finally:
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            procs = [*root.children(recursive=True), root]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        kill_survivors(procs, timeout_s=3)  # a Ray worker may ignore SIGTERM
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_head_refuses_clients_without_the_token(head: tuple[str, Path]) -> None:
    address, token = head
    strangers = {
        "no token (authentication off)": _client_env(RAY_AUTH_MODE="disabled"),
        "another token": _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 40),
    }
    for who, env in strangers.items():
        out = subprocess.run([RAY, "health-check", "--address", address], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, (who, out.stdout, out.stderr)
        assert "token" in (out.stdout + out.stderr).lower(), (who, out.stderr)
    holder = _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    out = subprocess.run([RAY, "health-check", "--address", address], env=holder,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", CONNECT, address], env=holder,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "CPUs 1.0" in out.stdout, out.stderr[-2000:]
