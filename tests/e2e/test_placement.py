"""Ray placement of workers: resources per pool, placement groups (one per worker)."""

from __future__ import annotations

import json
import subprocess
import sys

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
