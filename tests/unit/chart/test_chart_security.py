"""A security scanner (checkov, Kubernetes framework) passes over everything the chart renders.

checkov has no checks for the RayCluster kind, so the Ray head and worker pod templates are also
scanned as the Pods KubeRay makes of them. Every check the chart skips is skipped on purpose: a
`checkov.io/skipN` annotation on the resource carries the reason. One scan also covers a
deliberately insecure rendering, to show that the scanner does fail.
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import NAMESPACE, VALUES_FILES, render, tool

# Check id -> the resources (name fragments) that may skip it.
ALLOWED_SKIPS = {
    "CKV_K8S_43": ("",),                 # image by tag (digest optional), every workload
    "CKV_K8S_15": ("",),                 # pull policy is a value, every workload
    "CKV_K8S_35": ("",),                 # Redis password as env (it is part of the URL)
    "CKV_K8S_38": ("planner",),          # only the planner mounts an API token
    "CKV_K8S_8": ("test-completion",),   # the run-to-completion test Pod has no probes
    "CKV_K8S_9": ("test-completion",),
    "CKV_K8S_25": ("-prefill", "-decode", "-both"),  # IPC_LOCK for RDMA, worker pods only
}
INSECURE = ("containerSecurityContext.allowPrivilegeEscalation=true",
            "containerSecurityContext.readOnlyRootFilesystem=false",
            "podSecurityContext.runAsNonRoot=false", "podSecurityContext.runAsUser=0")


def ray_pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pods KubeRay creates from the RayCluster's templates (one per group)."""
    pods = []
    for ray in (d for d in docs if d["kind"] == "RayCluster"):
        name = ray["metadata"]["name"]
        templates = [("head", ray["spec"]["headGroupSpec"]["template"])] + [
            (g["groupName"], g["template"]) for g in ray["spec"]["workerGroupSpecs"]]
        for group, tpl in templates:
            meta = dict(tpl.get("metadata", {}), name=f"{name}-{group}", namespace=NAMESPACE)
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                         "spec": tpl["spec"]})
    return pods


def write_scan_input(directory: Path, name: str, sets: tuple[str, ...], values: list[Path]
                     ) -> None:
    docs = render(values, sets).docs
    (directory / f"{name}.yaml").write_text(yaml.safe_dump_all(docs + ray_pods(docs)))


@cache
def scan(directory: Path) -> dict[str, Any]:
    for name, values in VALUES_FILES.items():
        write_scan_input(directory, name, (), values)
    write_scan_input(directory, "insecure", INSECURE, VALUES_FILES["cpu-dev"])
    proc = subprocess.run(
        [str(tool("checkov")), "--directory", str(directory), "--framework", "kubernetes",
         "--skip-download", "--compact", "--output", "json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["check_type"] == "kubernetes"
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return scan(tmp_path_factory.mktemp("checkov"))


def _file(check: dict[str, Any]) -> str:
    return Path(check["file_path"]).stem


def test_shipped_values_pass_the_scan(report: dict[str, Any]) -> None:
    failed = [f"{_file(c)}: {c['check_id']} {c['resource']} ({c['check_name']})"
              for c in report["results"]["failed_checks"] if _file(c) != "insecure"]
    assert not failed, "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    passed = [c for c in report["results"]["passed_checks"] if _file(c) in VALUES_FILES]
    assert len(passed) > 1000, "the scan checked too little"
    scanned = {c["resource"] for c in passed}
    for pod in ("rel-splitserve-head", "rel-splitserve-prefill", "rel-splitserve-decode"):
        assert f"Pod.{NAMESPACE}.{pod}" in scanned, f"Ray pod {pod} was not scanned"
    for kind in ("Deployment", "StatefulSet", "Role", "Service", "Pod"):
        assert any(r.startswith(f"{kind}.{NAMESPACE}.") for r in scanned), kind


def test_every_skip_is_justified_and_expected(report: dict[str, Any]) -> None:
    skipped = report["results"]["skipped_checks"]
    assert skipped, "the chart's skip annotations were not applied"
    for c in skipped:
        cid, res = c["check_id"], c["resource"]
        assert cid in ALLOWED_SKIPS, f"unexpected skip {cid} on {res}"
        assert any(f in res for f in ALLOWED_SKIPS[cid]), \
            f"{cid} may only be skipped on {ALLOWED_SKIPS[cid]}, not {res}"
        reason = c["check_result"].get("suppress_comment", "")
        assert len(reason) > 30, f"{cid} on {res} is skipped without a reason"
    # The password skip appears exactly where a password Secret is used.
    with_password = {_file(c) for c in skipped if c["check_id"] == "CKV_K8S_35"}
    assert with_password == {"gpu-production", "external-redis"}
    with_rdma = {(_file(c), c["resource"]) for c in skipped if c["check_id"] == "CKV_K8S_25"}
    assert with_rdma == {("gpu-production", f"Pod.{NAMESPACE}.rel-splitserve-prefill"),
                         ("gpu-production", f"Pod.{NAMESPACE}.rel-splitserve-decode")}


def test_the_scanner_fails_an_insecure_rendering(report: dict[str, Any]) -> None:
    failed = {c["check_id"] for c in report["results"]["failed_checks"]
              if _file(c) == "insecure"}
    # privilege escalation, writable root filesystem, root user
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23"} <= failed, failed
