"""The Helm chart for tests: render it with the real helm binary, look objects up, validate them.

helm (and checkov) are installed by scripts/install_chart_tools.sh into .cache/tools (or
$SPLITSERVE_TOOLS_DIR); a missing tool is an error that says how to install it, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "splitserve"
VALUES_DIR = REPO / "deploy" / "helm" / "values"
CRD_SCHEMAS = REPO / "deploy" / "helm" / "schemas"
TOOLS = Path(os.environ.get("SPLITSERVE_TOOLS_DIR", REPO / ".cache" / "tools"))
KUBERNETES_VERSION = "1.33.0"
RELEASE = "rel"
NAMESPACE = "splitserve"

# The values files the chart ships, by name ("default" is values.yaml alone).
VALUES_FILES: dict[str, list[Path]] = {
    "default": [],
    "cpu-dev": [VALUES_DIR / "cpu-dev.yaml"],
    "gpu-production": [VALUES_DIR / "gpu-production.yaml"],
    "external-redis": [VALUES_DIR / "external-redis.yaml"],
}


def tool(name: str) -> Path:
    """Path of an installed chart tool (helm, kubectl, checkov)."""
    path = TOOLS / "checkov-venv" / "bin" / name if name == "checkov" else TOOLS / "bin" / name
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} is not installed at {path}: run scripts/install_chart_tools.sh")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with the given arguments (no cluster is contacted by template/lint)."""
    env = dict(os.environ, HELM_CACHE_HOME=str(TOOLS / "helm-home" / "cache"),
               HELM_CONFIG_HOME=str(TOOLS / "helm-home" / "config"),
               HELM_DATA_HOME=str(TOOLS / "helm-home" / "data"))
    proc = subprocess.run([str(tool("helm")), *args], capture_output=True, text=True, env=env,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template_args(values: list[Path], sets: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in values:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return args


def render_text(values: list[Path], sets: tuple[str, ...] = ()) -> str:
    return helm(*template_args(values, sets)).stdout


@dataclass
class Manifests:
    """The objects of one `helm template`."""

    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """The object of that kind named `<release>-splitserve<name>` (or exactly `name`)."""
        want = {name, f"{RELEASE}-splitserve{name}"}
        found = [d for d in self.all(kind) if d["metadata"]["name"] in want]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        want = {name, f"{RELEASE}-splitserve{name}"}
        return any(d["metadata"]["name"] in want for d in self.all(kind))

    def pod_templates(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(owner, pod template) of every workload, the RayCluster's head and groups included."""
        for d in self.docs:
            kind, name = d["kind"], d["metadata"]["name"]
            if kind in ("Deployment", "StatefulSet"):
                yield f"{kind}/{name}", d["spec"]["template"]
            elif kind == "Pod":
                yield f"Pod/{name}", {"metadata": d["metadata"], "spec": d["spec"]}
            elif kind == "RayCluster":
                yield f"RayCluster/{name}/head", d["spec"]["headGroupSpec"]["template"]
                for g in d["spec"].get("workerGroupSpecs", []):
                    yield f"RayCluster/{name}/{g['groupName']}", g["template"]


def render(values: list[Path], sets: tuple[str, ...] = ()) -> Manifests:
    return Manifests([d for d in yaml.safe_load_all(render_text(values, sets)) if d])


@cache
def render_named(name: str) -> Manifests:
    """The chart rendered with one of VALUES_FILES (cached for the session)."""
    return render(VALUES_FILES[name])


def container(template: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in template["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value (str) or valueFrom (dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def expand(text: str, env: dict[str, Any]) -> str:
    """Kubernetes' $(VAR) expansion of args and env values."""
    for k, v in env.items():
        if isinstance(v, str):
            text = text.replace(f"$({k})", v)
    return text


# --- schema validation -------------------------------------------------------------------------

@cache
def _crd_schemas() -> tuple[dict[tuple[str, str], dict], Registry]:
    base = (files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json")
    definitions = json.loads(base.read_text())
    schemas = {}
    for f in sorted(CRD_SCHEMAS.glob("*.json")):
        s = json.loads(f.read_text())
        schemas[(s["properties"]["apiVersion"]["enum"][0], s["properties"]["kind"]["enum"][0])] = s
    registry = Registry().with_resources(
        [(definitions["$id"], Resource.from_contents(definitions))]
        + [(s["$id"], Resource.from_contents(s)) for s in schemas.values()])
    return schemas, registry


def crd_kinds() -> set[tuple[str, str]]:
    """(apiVersion, kind) of the vendored CRD schemas."""
    return set(_crd_schemas()[0])


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Why `doc` is not a valid object: Kubernetes' strict OpenAPI schemas for built-in kinds,
    the vendored CRD schemas (deploy/helm/schemas) for RayCluster, ServiceMonitor and
    PrometheusRule. An object of any other kind is an error, not a pass."""
    schemas, registry = _crd_schemas()
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in schemas:
        validator = jsonschema.Draft202012Validator(schemas[key], registry=registry)
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
                for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key} (Kubernetes {KUBERNETES_VERSION} or deploy/helm/schemas)"]
    return []
