"""Real Ray nodes for tests: `ray start --head --block` (and `ray start --address --block` for
another node) on 127.0.0.1 and free ports, in a short temp directory (Ray's socket paths),
each stopped by the PIDs of its process tree."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import psutil

from services.ports import free_port
from services.processes import kill_survivors

RAY = str(Path(sys.executable).parent / "ray")
NODE_PORTS = ("node-manager-port", "object-manager-port", "min-worker-port",
              "runtime-env-agent-port", "dashboard-agent-grpc-port",
              "dashboard-agent-listen-port", "metrics-export-port")


def ray_env(**extra: str) -> dict[str, str]:
    """This environment without Ray authentication settings, usage stats off, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env | extra


class RayNode:
    """One `ray start --block` process tree."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, dict(env), log
        self.proc: subprocess.Popen | None = None

    def start(self, wait_port: int | None = None, timeout_s: float = 60) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while wait_port is not None:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", wait_port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text(errors="replace")
                time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            return [*root.children(recursive=True), root]
        return []

    def kill(self) -> None:
        """SIGKILL the whole tree at once (a crash: nothing shuts down in order)."""
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        kill_survivors(procs, timeout_s=3)  # a Ray worker may ignore SIGTERM
        if self.proc is not None:
            self.proc.wait(10)


def _ports() -> list[str]:
    return [f"--{name}={free_port()}" for name in NODE_PORTS] + ["--max-worker-port=0"]


def head_node(log: Path, port: int, temp_dir: Path, num_cpus: int = 1,
              env: Mapping[str, str] | None = None, resources: str = "") -> RayNode:
    """A Ray head on 127.0.0.1:`port` (not started). `env` is its environment (default:
    ray_env(RAY_AUTH_MODE="disabled")); `resources` its --resources JSON."""
    argv = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", f"--ray-client-server-port={free_port()}", *_ports()]
    if resources:
        argv.append(f"--resources={resources}")
    return RayNode(argv, env if env is not None else ray_env(RAY_AUTH_MODE="disabled"), log)


def worker_node(log: Path, address: str, num_cpus: int = 1,
                env: Mapping[str, str] | None = None, resources: str = "") -> RayNode:
    """Another Ray node of the cluster at `address` (not started)."""
    argv = [RAY, "start", f"--address={address}", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--disable-usage-stats", *_ports()]
    if resources:
        argv.append(f"--resources={resources}")
    return RayNode(argv, env if env is not None else ray_env(RAY_AUTH_MODE="disabled"), log)


def short_temp_dir() -> Path:
    """A directory short enough for Ray's AF_UNIX socket paths."""
    d = Path(os.path.realpath("/tmp")) / f"ssray-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int = 1, env: Mapping[str, str] | None = None,
             resources: str = "") -> Iterator[str]:
    """Start a Ray head; yield its GCS address (127.0.0.1:port); stop it."""
    d = short_temp_dir()
    port = free_port()
    head = head_node(log, port, d / "ray", num_cpus, env, resources)
    try:
        head.start(wait_port=port)
        yield f"127.0.0.1:{port}"
    finally:
        head.stop()
        shutil.rmtree(d, ignore_errors=True)
