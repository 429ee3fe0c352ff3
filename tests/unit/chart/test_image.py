"""The image the chart runs (deploy/docker/Dockerfile) and the chart agree: the built-in model
path, the non-root user, what the build context keeps, the install it performs."""

from __future__ import annotations

import fnmatch
import re

import yaml

from tests.support.chart import CHART, REPO

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "docker" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    """Docker's .dockerignore semantics: the last matching pattern wins, ! re-includes."""
    result = False
    for pat in DOCKERIGNORE.read_text().splitlines():
        pat = pat.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if pat == "**" or fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") \
                or fnmatch.fnmatch(path, pat.replace("**/", "")):
            result = not neg
    return result


def test_dockerfile_installs_with_the_project_script_and_builds_the_builtin_model() -> None:
    ins = instructions()
    assert ins[0][0] == "ARG" and ins[1] == ("FROM", "${PYTHON_IMAGE}")
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in ins
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "./scripts/install.sh" in runs and 'SPLITSERVE_DEVICE="$DEVICE"' in runs
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"splitserve make-model {values['model']['builtinPath']}" in runs
    user = [a for i, a in ins if i == "USER"]
    uid = values["podSecurityContext"]["runAsUser"]
    assert user == [f"{uid}:{values['podSecurityContext']['runAsGroup']}"]
    assert f"--uid {uid}" in runs


def test_every_copied_source_exists_and_survives_the_dockerignore() -> None:
    copies = [a.split()[0] for i, a in instructions() if i == "COPY"]
    assert {"pyproject.toml", "sdk/", "services/", "router/", "scripts/install.sh"} <= set(copies)
    for src in copies:
        assert (REPO / src).exists(), src
        assert not ignored(src.rstrip("/")), f"{src} is excluded from the build context"
    for excluded in (".venv", ".cache/tools/bin/helm", "runs/x", "tests/unit"):
        assert ignored(excluded), excluded
