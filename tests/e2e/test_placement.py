"""Ray placement of workers: resources per pool, placement groups (one per worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e


def status(cluster: RunningCluster) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                          "--redis-url", cluster.redis_url], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_workers_run_in_their_own_placement_groups_with_pool_resources(
        aggregated: RunningCluster) -> None:
    ws = status(aggregated)
    assert len(ws) == 2
    groups = {w["placement_group"] for w in ws}
    assert "" not in groups and len(groups) == 2, groups  # one reservation per worker
    for w in ws:
        assigned = json.loads(w["ray_resources"])
        assert assigned.get("both") == 1.0 and assigned.get("CPU") == 1.0, assigned


def test_single_device_workers_need_no_placement_group(disagg: RunningCluster) -> None:
    ws = status(disagg)
    assert ws and all(w["placement_group"] == "" for w in ws), ws
    assert all(json.loads(w["ray_resources"]).get("CPU") == 1.0 for w in ws)


def _cores(spec: str) -> set[int]:
    """CPU ids of a list like '0', '2-3' or '0,2'."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_engines_run_on_their_own_cores_at_the_configured_niceness(disagg: RunningCluster
                                                                   ) -> None:
    """Each engine's model runs on the core its worker was bound to (vLLM's NIXL connector
    moves the model thread to the host's last core unless we restore it); the engine
    processes run at the configured niceness 0, not Ray's default 15, and every thread of
    the worker actor steps back to `actor_niceness` (10) once its engine runs."""
    ws = status(disagg)
    assert {w["role"] for w in ws} == {"prefill", "decode"}, ws
    runner_cores: list[set[int]] = []
    for w in ws:
        actor = psutil.Process(w["pid"])
        threads = {t.id: os.getpriority(os.PRIO_PROCESS, t.id) for t in actor.threads()}
        assert len(threads) > 5 and set(threads.values()) == {10}, (w["worker_id"], threads)
        engine = [p for p in actor.children(recursive=True) if p.name().startswith("VLLM::")]
        assert {p.name() for p in engine} >= {"VLLM::EngineCore", "VLLM::Worker"}, engine
        for p in engine:
            nice = {os.getpriority(os.PRIO_PROCESS, t.id) for t in p.threads()}
            assert nice == {0}, (w["worker_id"], p.name(), nice)
        runner = next(p for p in engine if p.name() == "VLLM::Worker")
        bound = _cores(runner.environ()["VLLM_CPU_OMP_THREADS_BIND"])
        # The runner's main thread is OpenMP's master thread: it runs the model.
        assert set(os.sched_getaffinity(runner.pid)) == bound, (w["worker_id"], bound)
        runner_cores.append(bound)
    if (os.cpu_count() or 1) >= 2:
        assert runner_cores[0].isdisjoint(runner_cores[1]), runner_cores
