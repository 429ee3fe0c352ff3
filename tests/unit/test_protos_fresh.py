"""The committed generated gRPC code equals what proto/ generates now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert written
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = REPO / rel
        assert committed.exists(), f"{rel} is not committed: run python scripts/gen_protos.py"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{rel} is stale: run python scripts/gen_protos.py")
