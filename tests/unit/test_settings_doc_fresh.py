"""docs/settings.md is what the config models generate now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_settings_reference_is_fresh() -> None:
    spec = importlib.util.spec_from_file_location("gen_doc", REPO / "scripts" / "gen_settings_doc.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    text = mod.render()
    assert "| `block_size` |" in text and "| `mode` |" in text
    assert (REPO / "docs" / "settings.md").read_text() == text, (
        "docs/settings.md is stale: run python scripts/gen_settings_doc.py")
