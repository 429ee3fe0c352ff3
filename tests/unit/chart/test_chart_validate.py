"""The chart lints clean, renders for every shipped values file, and every object it renders is
valid against Kubernetes' own schemas (strict) or the vendored CRD schemas; bad values are
rejected by values.schema.json with helm's error."""

from __future__ import annotations

import copy

import pytest

from tests.support.chart import (CHART, VALUES_FILES, crd_kinds, helm, render_named,
                                 template_args, validation_errors)

NAMES = sorted(VALUES_FILES)


@pytest.mark.parametrize("name", NAMES)
def test_helm_lint_strict(name: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for f in VALUES_FILES[name]:
        args += ["-f", str(f)]
    proc = helm(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", NAMES)
def test_every_rendered_object_is_valid(name: str) -> None:
    docs = render_named(name).docs
    assert len(docs) >= 12
    problems = {f"{d['kind']}/{d['metadata']['name']}": errs
                for d in docs if (errs := validation_errors(d))}
    assert not problems, problems


def test_the_crd_schemas_cover_what_the_chart_renders() -> None:
    rendered = {(d["apiVersion"], d["kind"]) for d in render_named("gpu-production").docs}
    assert {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
            ("monitoring.coreos.com/v1", "PrometheusRule")} <= rendered
    assert crd_kinds() == {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1",
                                                         "ServiceMonitor"),
                           ("monitoring.coreos.com/v1", "PrometheusRule")}


def _get(docs: list[dict], kind: str) -> dict:
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind))


def test_the_validation_catches_broken_objects() -> None:
    """The check can fail: typos and wrong types inside CRDs and built-in kinds are reported."""
    docs = render_named("gpu-production").docs
    ray = _get(docs, "RayCluster")
    ray["spec"]["workerGroupSpecs"][0]["replica"] = 2  # typo of replicas
    assert any("replica" in e for e in validation_errors(ray))
    ray = _get(docs, "RayCluster")
    c = ray["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    c["ports"][0]["containerPort"] = "9100"  # a string where the pod spec wants an integer
    assert validation_errors(ray)
    ray = _get(docs, "RayCluster")
    del ray["spec"]["headGroupSpec"]["template"]
    assert any("template" in e for e in validation_errors(ray))
    sm = _get(docs, "ServiceMonitor")
    del sm["spec"]["selector"]
    assert any("selector" in e for e in validation_errors(sm))
    rule = _get(docs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert validation_errors(rule)
    dep = _get(docs, "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    assert validation_errors(dep)
    assert validation_errors({"apiVersion": "example.com/v1", "kind": "Unknown",
                              "metadata": {"name": "x"}}), "an unknown kind must not pass"


@pytest.mark.parametrize("sets, message", [
    (("engine.device=tpu",), "engine/device"),
    (("redis.mode=external",), "redis/external/url"),
    (("redis.mode=external", "redis.external.url=redis://user:pw@host:6379/0"),
     "redis/external/url"),
    (("model.source=pvc",), "model/pvc"),
    (("model.source=hub",), "model/hub/id"),
    (("gateway.httpPort=70000",), "gateway/httpPort"),
    (("rayCluster.workerGroups.prefill.replica=3",), "replica"),
    (("serving.policy=fastest",), "serving/policy"),
    (("engine.tensorParallelSize=2",), "tensorParallelSize"),
])
def test_values_schema_rejects_bad_values(sets: tuple[str, ...], message: str) -> None:
    proc = helm(*template_args([], sets), check=False)
    assert proc.returncode != 0, f"--set {sets} rendered"
    assert message in proc.stderr, proc.stderr
