"""End-to-end fixtures: whole clusters started with `splitserve up`, shared per session."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import redis

from services.controller.builtin_model import ensure_builtin_model
from tests.support.redis import redis_server
from tests.support.cluster import RunningCluster, start_test_cluster, cache_dir_for_tests


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Tests marked `own_cluster` (modules that start a cluster of their own) run first, before
    the session-wide clusters below start: 2 cores and 24 GiB do not hold all at once."""
    items[:] = ([i for i in items if i.get_closest_marker("own_cluster")]
                + [i for i in items if not i.get_closest_marker("own_cluster")])


PROMPT_TOKENS_DETAILS = "enable_prompt_tokens_details=true"
"""vLLM's server setting that puts usage.prompt_tokens_details (cached tokens) in answers."""

DISAGG_KV_BLOCKS = {"prefill": 6000, "decode": 7000}
"""KV cache blocks of the `disagg` cluster's engines, set per pool by engine arguments."""


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_builtin_model(cache_dir_for_tests(), "tiny")


def _cluster(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]
             ) -> Iterator[RunningCluster]:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    cluster = start_test_cluster(args, run_dir)
    ray_dir = run_dir / "ray"
    ray_session = ray_dir.resolve() if ray_dir.is_symlink() else None  # a short /tmp dir
    try:
        yield cluster
    finally:
        code = cluster.stop()
        leftovers = cluster.alive_descendants()
        if leftovers:
            cluster.kill()
        leaked = cluster.leaked_segments()
        assert code == 0, f"splitserve up exited {code}"
        assert not leftovers, f"processes survived the cluster: {leftovers}"
        assert cluster.shm_segments, "expected the engines to map shared memory"
        assert not leaked, f"shared-memory segments left behind: {leaked}"
        # Ray's logs stay with the run, and its short session directory is gone
        assert ray_session is not None, "run_dir/ray should link to a short session directory"
        assert not ray_session.exists(), f"Ray's session directory left behind: {ray_session}"
        assert not ray_dir.is_symlink() and list(ray_dir.glob("session_*/logs/raylet.out"))


@pytest.fixture(scope="session")
def disagg(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[RunningCluster]:
    """Disaggregated: one prefill and one decode worker, each pool with an engine argument of
    its own (KV cache sizes that differ, large enough to change nothing else)."""
    yield from _cluster(tmp_path_factory, "disagg", [
        "--mode", "disaggregated", "--engine-arg", "max_num_batched_tokens=2048",
        "--route-headers", f"--frontend-arg={PROMPT_TOKENS_DETAILS}",
        "--prefill-engine-arg", f"num_gpu_blocks_override={DISAGG_KV_BLOCKS['prefill']}",
        "--decode-engine-arg", f"num_gpu_blocks_override={DISAGG_KV_BLOCKS['decode']}"])


@pytest.fixture(scope="session")
def aggregated(tmp_path_factory: pytest.TempPathFactory, model_dir: Path
               ) -> Iterator[RunningCluster]:
    """Aggregated: two workers of role both (the KV-aware router has a choice to make), on an
    external Redis given with --redis-url, which `up` must use and must leave running; each
    worker in a placement group of its own, with a custom Ray resource (node placement)."""
    with redis_server() as external:
        yield from _cluster(tmp_path_factory, "agg", ["--mode", "aggregated", "--workers", "2",
                                                      "--placement-group", "always",
                                                      "--route-headers",
                                                      f"--frontend-arg={PROMPT_TOKENS_DETAILS}",
                                                      "--workers-resources", '{"both": 1}',
                                                      "--redis-url", external.url])
        client = redis.Redis.from_url(external.url)
        assert client.ping(), "up stopped a Redis it did not start"
        assert client.keys("splitserve:worker:*") == [], "workers left registry entries behind"
        assert client.keys("splitserve:kv:n:*") == [], "workers left index entries behind"
        assert client.keys("splitserve:kv:b:*") == [], "workers left index entries behind"
        client.close()
