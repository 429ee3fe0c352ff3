"""The chart's `helm test` Pod runs its check against a real cluster: the script and environment
are taken from the rendered test Pod (cpu-dev values), only the gateway address is this cluster's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.chart import VALUES_FILES, container, env_of, render_named
from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e


def run_hook(cluster: RunningCluster, **overrides: str) -> subprocess.CompletedProcess[str]:
    pod = render_named("cpu-dev").get("Pod", "-test-completion")
    c = container({"spec": pod["spec"]}, "test")
    env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
    assert cluster.grpc, "the test cluster serves gRPC"
    env.update(SPLITSERVE_HTTP=cluster.http, SPLITSERVE_GRPC=cluster.grpc, SPLITSERVE_WAIT_S="60",
               **overrides)
    argv = [sys.executable, *c["command"][1:], *c["args"]]  # python -c <script>
    return subprocess.run(argv, env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300)


def test_helm_test_passes_against_a_serving_cluster(disagg: RunningCluster) -> None:
    assert VALUES_FILES["cpu-dev"]
    proc = run_hook(disagg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ok: /v1/models lists ['splitserve-tiny']" in out
    assert "ok: /v1/completions 8 tokens" in out
    assert "ok: gRPC ListModels lists ['splitserve-tiny']" in out
    assert out.rstrip().endswith("helm test passed")


def test_helm_test_fails_when_the_model_is_not_served(disagg: RunningCluster) -> None:
    proc = run_hook(disagg, SPLITSERVE_MODEL="no-such-model")
    assert proc.returncode == 1
    assert "FAILED: GET /v1/models" in proc.stderr and "no-such-model" in proc.stderr
