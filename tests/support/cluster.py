"""Clusters for tests: `splitserve up` subprocesses, with the tests' own cache directory, and
the cluster secret tests need to call a cluster's workers directly."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from services.cluster_secret import FILE_NAME, ClusterSecret
from services.controller.launcher import RunningCluster, start_cluster
from services.grpc_auth import client_interceptors

__all__ = ["RunningCluster", "start_test_cluster", "cache_dir_for_tests", "cluster_secret",
           "worker_channel", "TEST_SECRET"]

REPO = Path(__file__).resolve().parents[2]

TEST_SECRET = ClusterSecret.from_text("splitserve-tests-cluster-secret-0123456789")
"""The secret of workers and gateways that tests start in-process (not the clusters' own)."""


def cache_dir_for_tests() -> Path:
    """Built-in models and compiled kernels for tests (kept between runs)."""
    return Path(os.environ.get("SPLITSERVE_TEST_CACHE", REPO / ".cache" / "test"))


def start_test_cluster(args: list[str], run_dir: Path, timeout_s: float = 420) -> RunningCluster:
    """Start `splitserve up ARGS` with the tests' cache directory."""
    return start_cluster(args, run_dir, cache_dir_for_tests(), timeout_s)


def cluster_secret(cluster: RunningCluster) -> ClusterSecret:
    """The secret `up` generated for `cluster` (its run directory's cluster-secret file)."""
    return ClusterSecret.read(cluster.run_dir / FILE_NAME)


def worker_channel(secret: ClusterSecret, address: str) -> grpc.aio.Channel:
    """A gRPC channel to a worker whose every call carries `secret`'s token."""
    return grpc.aio.insecure_channel(address, interceptors=client_interceptors(secret))
