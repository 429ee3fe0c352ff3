"""Clusters for tests: `splitserve up` subprocesses, with the tests' own cache directory."""

from __future__ import annotations

import os
from pathlib import Path

from services.controller.launcher import RunningCluster, start_cluster

__all__ = ["RunningCluster", "start_test_cluster", "cache_dir_for_tests"]

REPO = Path(__file__).resolve().parents[2]


def cache_dir_for_tests() -> Path:
    """Built-in models and compiled kernels for tests (kept between runs)."""
    return Path(os.environ.get("SPLITSERVE_TEST_CACHE", REPO / ".cache" / "test"))


def start_test_cluster(args: list[str], run_dir: Path, timeout_s: float = 420) -> RunningCluster:
    """Start `splitserve up ARGS` with the tests' cache directory."""
    return start_cluster(args, run_dir, cache_dir_for_tests(), timeout_s)
