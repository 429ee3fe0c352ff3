"""Runs `splitserve up` as a subprocess and stops it by PID (used by `splitserve bench` to start
clusters of its own, and by the end-to-end tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from services.worker.shm import segments_mapped_by_children

READY = re.compile(r"splitserve ready: http=(?P<http>\S+)(?: grpc=(?P<grpc>\S+))?.* "
                   r"redis=(?P<redis>\S+) "
                   r"run_dir=(?P<run_dir>\S+)")


@dataclass
class RunningCluster:
    """A `splitserve up` process and what it printed."""

    proc: subprocess.Popen
    http: str
    redis_url: str
    run_dir: Path
    log_path: Path
    grpc: str | None = None  # host:port of the public gRPC API, when served
    descendants: set[int] = field(default_factory=set)
    shm_segments: set[Path] = field(default_factory=set)

    def snapshot_descendants(self) -> set[int]:
        """Remember every process the cluster runs now, and the shared-memory segments they
        map (to check that none survives the stop)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
            self.descendants |= {p.pid for p in kids}
        except psutil.Error:
            pass
        self.shm_segments |= segments_mapped_by_children(self.proc.pid)
        return self.descendants

    def leaked_segments(self) -> list[Path]:
        """Segments its processes mapped that still exist."""
        return sorted(p for p in self.shm_segments if p.exists())

    def stop(self, timeout_s: float = 90) -> int:
        """SIGINT, as an operator's Ctrl-C; returns the exit code."""
        self.snapshot_descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """Last resort for a cluster that did not stop: kill it and its descendants by PID."""
        procs = []
        for pid in self.snapshot_descendants() | {self.proc.pid}:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)

    def alive_descendants(self) -> list[psutil.Process]:
        alive = []
        for pid in self.descendants:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive


def start_cluster(args: list[str], run_dir: Path, cache_dir: Path, timeout_s: float = 420
                  ) -> RunningCluster:
    """Start `splitserve up ARGS` and wait for its ready line."""
    log_path = run_dir.parent / f"{run_dir.name}.out"
    env = dict(os.environ, SPLITSERVE_CACHE_DIR=str(cache_dir))
    out = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", "0", "--grpc-port", "-1",
         "--run-dir", str(run_dir),
         *args],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    out.close()
    deadline = time.monotonic() + timeout_s
    starting = RunningCluster(proc, "", "", run_dir, log_path)
    try:
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if m := READY.search(text):
                cluster = RunningCluster(proc, m["http"], m["redis"], Path(m["run_dir"]),
                                         log_path, grpc=m["grpc"])
                cluster.snapshot_descendants()
                return cluster
            if proc.poll() is not None:
                raise RuntimeError(f"splitserve up exited {proc.returncode}:\n{text[-4000:]}")
            starting.snapshot_descendants()
            time.sleep(0.5)
    except BaseException:  # interrupted while it starts: stop it, do not orphan it
        if proc.poll() is None:
            starting.stop(timeout_s=60)
        raise
    starting.stop(timeout_s=60)
    raise TimeoutError(f"cluster not ready in {timeout_s}s:\n{log_path.read_text()[-4000:]}")
