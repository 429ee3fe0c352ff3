"""The state file `splitserve up` leaves for `status` and `scale` (services/controller/
state_file.py), and those commands finding a cluster by it without --redis-url: against a real
Redis and real processes (a live one: this test; a gone one: a child that exited)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.controller.pool_sizes import PoolObservation, PoolSizes
from services.controller.state_file import (ClusterState, NoCluster, find_cluster,
                                            process_started_at, read_states, remove_state,
                                            state_dir, write_state)


def _state(pid: int, redis_url: str = "redis://127.0.0.1:1/0", namespace: str = "splitserve"
           ) -> ClusterState:
    return ClusterState(namespace=namespace, redis_url=redis_url, private_redis=True,
                        http="http://127.0.0.1:8000", run_dir="/tmp/x", pid=pid,
                        pid_started_at=process_started_at(pid))


def _gone_pid() -> tuple[int, float]:
    """The PID and start time of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    started = process_started_at(child.pid)
    child.wait()
    return child.pid, started


def test_state_dir_follows_the_environment(tmp_path: Path) -> None:
    assert state_dir({"SPLITSERVE_STATE_DIR": str(tmp_path)}) == tmp_path
    assert state_dir({"XDG_STATE_HOME": "/s"}) == Path("/s/splitserve")
    assert state_dir({}) == Path.home() / ".local" / "state" / "splitserve"


def test_write_find_remove(tmp_path: Path) -> None:
    with pytest.raises(NoCluster, match="no state file"):
        find_cluster("splitserve", tmp_path)
    path = write_state(_state(os.getpid()), tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    found = find_cluster("splitserve", tmp_path)
    assert found.pid == os.getpid() and found.redis_url == "redis://127.0.0.1:1/0"
    with pytest.raises(NoCluster):  # another namespace is another cluster
        find_cluster("other", tmp_path)
    write_state(_state(os.getpid(), namespace="splitserve.b"), tmp_path)
    assert find_cluster("splitserve", tmp_path).namespace == "splitserve"  # not "splitserve.b"
    remove_state(path)
    remove_state(path)  # idempotent
    with pytest.raises(NoCluster):
        find_cluster("splitserve", tmp_path)


def test_a_file_whose_process_is_gone_names_no_cluster(tmp_path: Path) -> None:
    pid, started = _gone_pid()
    state = _state(pid).model_copy(update={"pid_started_at": started})
    write_state(state, tmp_path)
    live, stale = read_states("splitserve", tmp_path)
    assert live == [] and [p.name for p in stale] == [f"splitserve.{pid}.json"]
    with pytest.raises(NoCluster, match=f"pid {pid}.*is gone"):
        find_cluster("splitserve", tmp_path)
    # a PID now used by another process (different start time) is not the cluster either
    reused = _state(os.getpid()).model_copy(update={"pid_started_at": 1.0})
    write_state(reused, tmp_path)
    assert read_states("splitserve", tmp_path)[0] == []
    (tmp_path / "clusters" / "splitserve.9.json").write_text("{not json")
    assert len(read_states("splitserve", tmp_path)[1]) == 3


def test_two_live_clusters_of_one_namespace_need_a_choice(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_state(_state(os.getpid(), "redis://a"), tmp_path)
        write_state(_state(child.pid, "redis://b"), tmp_path)
        with pytest.raises(NoCluster, match="2 clusters.*redis://a.*redis://b.*--redis-url"):
            find_cluster("splitserve", tmp_path)
    finally:
        child.kill()
        child.wait()


def _cli(state: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ, SPLITSERVE_STATE_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


async def test_status_and_scale_find_the_cluster_without_flags(tmp_path: Path, r: Redis,
                                                               redis_srv) -> None:
    out = _cli(tmp_path, "status")
    assert out.returncode == 2 and "no cluster of namespace 'splitserve' is running" in out.stderr
    out = _cli(tmp_path, "scale", "--decode", "2")
    assert out.returncode == 2 and "no cluster" in out.stderr
    pid, started = _gone_pid()
    stale = write_state(_state(pid, redis_srv.url).model_copy(update={"pid_started_at": started}),
                        tmp_path)
    out = _cli(tmp_path, "status")
    assert out.returncode == 2 and "is gone" in out.stderr
    remove_state(stale)

    # a live cluster (this process stands in for `up`) whose Redis is the test's
    await WorkerRegistry(r, "splitserve").register(WorkerInfo(
        worker_id="decode-0-abc", role=WorkerRole.DECODE, address="127.0.0.1:5", model="m"))
    await PoolSizes(r, "splitserve").publish_observed({"decode": PoolObservation(serving=1)})
    write_state(_state(os.getpid(), redis_srv.url), tmp_path)
    out = _cli(tmp_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    assert '"worker_id": "decode-0-abc"' in out.stdout
    out = _cli(tmp_path, "scale", "--decode", "2")
    assert out.returncode == 0 and "desired: decode=2" in out.stdout, out.stderr
    assert await PoolSizes(r, "splitserve").desired() == {"decode": 2}
    # an explicit --redis-url still wins
    out = _cli(tmp_path, "status", "--redis-url", "redis://127.0.0.1:1/0")
    assert out.returncode == 2 and "redis://127.0.0.1:1/0" in out.stderr
