"""docs/kubernetes.md's values reference is generated from values.yaml and must be fresh; every
key of values.yaml is documented there."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.support.chart import CHART, REPO

GEN = REPO / "deploy" / "helm" / "gen_values_doc.py"


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and not k.endswith(("resources", "SecurityContext",
                                                         "Annotations", "labels", "requests",
                                                         "limits", "nodeSelector", "affinity")):
            keys |= leaf_keys(v, path + ".")
        else:
            keys.add(path)
    return keys


def test_values_reference_is_fresh() -> None:
    proc = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_value_is_documented() -> None:
    sys.path.insert(0, str(GEN.parent))
    try:
        from gen_values_doc import rows
    finally:
        sys.path.remove(str(GEN.parent))
    documented = {key for key, _, _ in rows((CHART / "values.yaml").read_text())}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = {k for k in leaf_keys(values)
               if not any(k == d or k.startswith(d + ".") for d in documented)}
    assert not missing, f"values without a `# -- ` description: {sorted(missing)}"
