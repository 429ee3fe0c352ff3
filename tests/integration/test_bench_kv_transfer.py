"""The KV-transfer benchmark moves real bytes between two processes with NIXL (UCX) and times
memcpy in the same run."""

from __future__ import annotations

import json
from pathlib import Path

from bench.kv_transfer import KvTransferConfig, main, run


def test_small_sizes_move_the_right_bytes(tmp_path: Path) -> None:
    cfg = KvTransferConfig(min_kib=64, max_mib=1, page_kib=16, min_reps=2, min_seconds=0.01)
    res = run(cfg)
    assert res.ucx_tls == "self,sm,tcp"
    contiguous = [p for p in res.points if p.pattern == "contiguous"]
    paged = [p for p in res.points if p.pattern == "paged"]
    assert [p.bytes for p in contiguous] == [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]
    assert [p.descriptors for p in paged] == [4, 8, 16, 32, 64]
    for p in res.points:  # every READ was checked against the pattern before timing
        assert p.read_gb_s > 0 and p.write_gb_s > 0 and p.numpy_gb_s > 0 and p.torch_gb_s > 0
        assert p.read_ratio == p.read_gb_s / max(p.numpy_gb_s, p.torch_gb_s)


def test_cli_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    assert main(["--max-mib", "1", "--min-kib", "512", "--page-kib", "0", "--min-reps", "1",
                 "--min-seconds", "0.01", "--json", str(out), "--markdown",
                 str(tmp_path / "kv.md"), "--plot", str(tmp_path / "kv.png")]) == 0
    doc = json.loads(out.read_text())
    assert [p["bytes"] for p in doc["points"]] == [512 << 10, 1 << 20]
    assert (tmp_path / "kv.md").read_text().count("\n") == 4
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--min-kib", "1"]) == 2  # below the 4 KiB minimum: a clear error, exit 2
