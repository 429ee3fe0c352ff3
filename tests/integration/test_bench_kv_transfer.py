"""The KV-transfer benchmark moves real bytes between two processes with NIXL (UCX) and times
memcpy in the same run.

Each run is a process of its own (`python -m bench.kv_transfer`): NIXL/UCX set up in a
long-lived pytest process that has already loaded vLLM, gRPC and Ray aborts the interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def kv_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.kv_transfer", *args],
                          capture_output=True, text=True, timeout=300)


def test_small_sizes_move_the_right_bytes(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    run = kv_bench("--min-kib", "64", "--max-mib", "1", "--page-kib", "16", "--min-reps", "2",
                   "--min-seconds", "0.01", "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ucx_tls"] == "self,sm,tcp"
    by = {}
    for p in res["points"]:
        by.setdefault(p["pattern"], []).append(p)
    assert list(by) == ["contiguous", "pages-ascending", "pages-descending",
                        "pages-descending-ordered", "pages-scattered"]
    assert [p["bytes"] for p in by["contiguous"]] == [64 << 10, 128 << 10, 256 << 10, 512 << 10,
                                                      1 << 20]
    for pattern in list(by)[1:]:
        assert [p["descriptors"] for p in by[pattern]] == [4, 8, 16, 32, 64]
    # NIXL merges pages that ascend on both sides, nothing else; splitserve's connector order
    # turns vLLM's descending runs into ascending ones (the same pairs: checked byte for byte).
    assert all(p["merged_descriptors"] == 1 for p in by["contiguous"] + by["pages-ascending"]
               + by["pages-descending-ordered"])
    assert [p["merged_descriptors"] for p in by["pages-descending"]] == [4, 8, 16, 32, 64]
    assert all(p["merged_descriptors"] >= p["descriptors"] - 2 for p in by["pages-scattered"])
    for p in res["points"]:  # every READ was checked against the pattern before timing
        assert p["read_gb_s"] > 0 and p["write_gb_s"] > 0
        assert p["numpy_gb_s"] > 0 and p["torch_gb_s"] > 0
        assert p["read_ratio"] == p["read_gb_s"] / max(p["numpy_gb_s"], p["torch_gb_s"])
    # this machine's memcpy: buffers 4 x its last-level cache (>= 64 MiB), before and after
    machine = res["machine"]
    assert machine["buffer_bytes"] == max(4 * machine["last_level_cache_bytes"], 64 << 20)
    assert len(machine["numpy_runs_gb_s"]) == len(machine["torch_runs_gb_s"]) == 2
    assert machine["numpy_gb_s"] == max(machine["numpy_runs_gb_s"]) > 0
    for p in res["points"]:
        assert p["read_ratio_machine"] == p["read_gb_s"] / machine["numpy_gb_s"]


def test_cli_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    run = kv_bench("--max-mib", "1", "--min-kib", "512", "--page-kib", "0", "--min-reps", "1",
                   "--min-seconds", "0.01", "--machine-mib", "16", "--json", str(out),
                   "--markdown", str(tmp_path / "kv.md"), "--plot", str(tmp_path / "kv.png"))
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [p["bytes"] for p in doc["points"]] == [512 << 10, 1 << 20]
    assert doc["machine"]["buffer_bytes"] == 16 << 20
    md = (tmp_path / "kv.md").read_text()
    assert md.startswith("This machine's memcpy (2 x 16 MiB")
    assert md.count("\n") == 6  # the machine's memcpy, blank, header, rule, 2 sizes
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    bad = kv_bench("--min-kib", "1")  # below the 4 KiB minimum: a clear error, exit 2
    assert bad.returncode == 2 and bad.stderr.strip()


def test_split_trial_reads_the_parts_on_several_ucx_threads(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    run = kv_bench("--min-kib", "512", "--max-mib", "1", "--page-kib", "0", "--min-reps", "2",
                   "--min-seconds", "0.01", "--machine-mib", "16", "--split-threads", "2",
                   "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["split_threads"] == 2
    pts = [(p["pattern"], p["bytes"], p["descriptors"]) for p in res["points"]]
    assert pts == [("contiguous", 512 << 10, 1), ("contiguous-split2", 512 << 10, 2),
                   ("contiguous", 1 << 20, 1), ("contiguous-split2", 1 << 20, 2)]
    # both parts arrived (checked byte for byte before timing) and NIXL did not merge them
    for p in res["points"]:
        assert p["read_gb_s"] > 0 and p["merged_descriptors"] == p["descriptors"]
