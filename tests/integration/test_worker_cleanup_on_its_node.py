"""A failed worker is cleaned up on its own node (services/controller/pools.py): for a worker
whose endpoints name another host, the controller's SIGKILL of its process tree and the removal
of its /dev/shm files run in a Ray task pinned to the worker's Ray node, on a real local Ray;
a worker whose node Ray does not know is left alone (nothing of this host is touched)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import ray

from services.controller.pools import WorkerHandle, kill_worker_processes
from services.worker.config import WorkerConfig

SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
          "'import time; time.sleep(600)']); time.sleep(600)"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray of this test process; the id of its one node."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = Path(os.path.realpath("/tmp")) / f"sscl-{os.getpid()}"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=str(temp))
    try:
        yield ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def _engine(tmp_path: Path) -> tuple[psutil.Process, Path]:
    """A stand-in worker: a process with a child, and a /dev/shm file its endpoints list."""
    proc = psutil.Process(subprocess.Popen([sys.executable, "-c", SLEEPER]).pid)
    deadline = time.monotonic() + 10
    while not proc.children():
        assert time.monotonic() < deadline, "the stand-in engine did not start its child"
        time.sleep(0.05)
    shm = Path("/dev/shm") / f"splitserve-test-{uuid.uuid4().hex}"
    shm.write_bytes(b"kv")
    return proc, shm


def _handle(tmp_path: Path, proc: psutil.Process, shm: Path, node_id: str) -> WorkerHandle:
    # (only its id matters here)
    cfg = WorkerConfig.model_construct(worker_id=f"decode-{uuid.uuid4().hex[:6]}",
                                       run_dir=tmp_path)
    ep = {"pid": proc.pid, "node": "another-host.invalid", "ray_node_id": node_id,
          "engine_pids": [c.pid for c in proc.children(recursive=True)],
          "shm_segments": [str(shm)]}
    return WorkerHandle(cfg=cfg, actor=None, pool="decode", endpoints=ep,
                        serving_wall=time.time() + 1)


def test_a_worker_on_another_node_is_killed_there(local_ray: str, tmp_path: Path) -> None:
    proc, shm = _engine(tmp_path)
    tree = [proc, *proc.children(recursive=True)]
    try:
        killed = kill_worker_processes(_handle(tmp_path, proc, shm, local_ray), tmp_path)
        assert sorted(killed) == sorted(p.pid for p in tree)
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, alive
        assert not shm.exists(), "its /dev/shm file was not removed on its node"
    finally:
        for p in tree:
            if p.is_running():
                p.kill()
        shm.unlink(missing_ok=True)


def test_a_worker_whose_node_is_unknown_is_left_alone(local_ray: str, tmp_path: Path) -> None:
    proc, shm = _engine(tmp_path)
    tree = [proc, *proc.children(recursive=True)]
    try:
        unknown = "ab" * 28  # a well-formed node id of no node
        assert kill_worker_processes(_handle(tmp_path, proc, shm, unknown), tmp_path) == []
        assert all(p.is_running() for p in tree), "it killed processes on the wrong host"
        assert shm.exists()
    finally:
        for p in tree:
            p.kill()
        shm.unlink(missing_ok=True)
