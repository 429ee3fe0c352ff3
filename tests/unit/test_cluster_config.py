"""Controller decisions that need no running cluster: pools, placement, desired sizes."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.controller.config import ClusterConfig, PoolConfig
from services.controller.pool_sizes import PoolObservation, PoolSizes
from services.controller.pools import WorkerHandle, WorkerPools, WorkerState, placement_bundle, \
    plan_workers, pool_roles
from services.worker.config import EngineConfig, WorkerConfig


def test_placement_groups_for_multi_gpu_workers_only() -> None:
    assert placement_bundle(PoolConfig(num_gpus=1)) is None
    assert placement_bundle(PoolConfig(num_gpus=4, num_cpus=2, resources={"decode": 1})) == \
        {"CPU": 2, "GPU": 4, "decode": 1}
    assert placement_bundle(PoolConfig(num_gpus=4, placement_group="never")) is None
    assert placement_bundle(PoolConfig(num_gpus=0, placement_group="always")) == {"CPU": 1.0}


def test_pools_by_mode() -> None:
    engine = EngineConfig(model="m")
    d = ClusterConfig(engine=engine, prefill=PoolConfig(replicas=2), decode=PoolConfig(replicas=3))
    assert list(pool_roles(d)) == ["prefill", "decode"]
    assert [(r.value, i) for r, _, i in plan_workers(d)] == [
        ("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1), ("decode", 2)]
    a = ClusterConfig(engine=engine, mode="aggregated", workers=PoolConfig(replicas=2))
    assert list(pool_roles(a)) == ["both"]


def test_workers_advertise_their_node_when_ray_is_not_local() -> None:
    engine = EngineConfig(model="m")
    assert ClusterConfig(engine=engine).advertised_host == "127.0.0.1"
    assert ClusterConfig(engine=engine, ray_address="10.0.0.5:6379").advertised_host == "auto"
    assert ClusterConfig(engine=engine, ray_address="auto",
                         worker_host="10.0.0.9").advertised_host == "10.0.0.9"


def _handle(state: WorkerState, created: float) -> WorkerHandle:
    cfg = WorkerConfig(worker_id=f"w{created}", role="decode", engine=EngineConfig(model="m"),
                       redis_url="redis://x", run_dir="/tmp", cache_dir="/tmp")
    return WorkerHandle(cfg=cfg, actor=None, pool="decode", state=state, created_at=created)


def test_shrinking_removes_starting_workers_first_then_the_newest() -> None:
    old, new = _handle(WorkerState.SERVING, 1.0), _handle(WorkerState.SERVING, 5.0)
    starting = _handle(WorkerState.STARTING, 3.0)
    assert WorkerPools._victims([old, new, starting], 1) == [starting]
    assert WorkerPools._victims([old, new, starting], 2) == [starting, new]


@pytest.mark.parametrize("pool,n", [("gpu", 1), ("decode", -1), ("decode", 10_001),
                                    ("decode", 1.5), ("decode", True)])
def test_impossible_sizes_are_refused(pool: str, n: object) -> None:
    with pytest.raises(ValueError):
        PoolSizes.check(pool, n)  # type: ignore[arg-type]


def test_a_pool_may_have_ten_thousand_workers() -> None:
    PoolSizes.check("decode", 10_000)  # issue 18: no fixed pool cap below 10,000


async def test_desired_and_observed_round_trip(r: Redis) -> None:
    sizes = PoolSizes(r, "t")
    assert await sizes.init_desired({"prefill": 1, "decode": 2}) == {"prefill": 1, "decode": 2}
    await sizes.set_desired({"decode": 4}, by="cli")
    assert await sizes.init_desired({"decode": 9}) == {"prefill": 1, "decode": 4}  # kept
    assert (await r.xrange(sizes.events_key))[-1][1][b"by"] == b"cli"
    await sizes.publish_observed({"decode": PoolObservation(serving=3, starting=1, restarts=2)})
    observed, at = await sizes.observed()
    assert observed["decode"] == PoolObservation(serving=3, starting=1, restarts=2) and at > 0
    await sizes.clear()
    assert await sizes.desired() == {}


def _scale_cli(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "services.cli", "scale", *args],
                          capture_output=True, text=True, timeout=60)


async def test_scale_cli_refuses_what_cannot_be_done(r: Redis, redis_srv) -> None:
    url = redis_srv.url
    out = _scale_cli("--redis-url", url)
    assert out.returncode == 2 and "at least one of" in out.stderr
    out = _scale_cli("--decode", "-1", "--redis-url", url)
    assert out.returncode == 2 and "between 0 and" in out.stderr
    out = _scale_cli("--decode", "2", "--redis-url", url)  # no controller publishes here
    assert out.returncode == 2 and "no controller is running" in out.stderr
    sizes = PoolSizes(r, "splitserve")
    await sizes.publish_observed({"both": PoolObservation(serving=2)})  # an aggregated cluster
    out = _scale_cli("--decode", "2", "--redis-url", url)
    assert out.returncode == 2 and "has no decode pool" in out.stderr
    assert await sizes.desired() == {}  # nothing half-written
    out = _scale_cli("--workers", "3", "--redis-url", url)
    assert out.returncode == 0 and await sizes.desired() == {"both": 3}
    out = _scale_cli("--decode", "2", "--redis-url", "redis://127.0.0.1:1")
    assert out.returncode == 2 and "cannot reach Redis" in out.stderr


def test_kv_scorer_weights_from_up_flags() -> None:
    """`up --kv-scorer-weights` sets the kv policy's scorers (a gateway setting: comparable
    in paired rounds on one cluster)."""
    import argparse

    from services.cli import _scorer_weights, cluster_config, parse_args

    up = ["--mode", "aggregated", "--workers", "2", "--model", "/nonexistent/m",
          "--served-model-name", "m"]
    cc = cluster_config(parse_args(["up", *up, "--kv-scorer-weights", "ttft=1, shared_step=0.5"]))
    assert cc.kv_policy.scorer_weights == {"ttft": 1.0, "shared_step": 0.5}
    assert cluster_config(parse_args(["up", *up])).kv_policy.scorer_weights == \
        {"ttft": 1.0, "kv_pressure": 1.0, "cold_spread": 1.0, "shared_step": 1.0}
    for bad in ("ttft", "ttft=x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _scorer_weights(bad)


def test_gateway_replica_and_feed_from_up_flags_and_file(tmp_path) -> None:
    """The gateway's replica and registry feed are on by default; `up --no-index-replica
    --no-registry-feed` (or false in its --config file) turn them off, in the gateway `up`
    starts and the gateways `bench --compare` starts beside it."""
    from router.replica_config import IndexReplicaConfig, RegistryFeedConfig
    from services.cli import cluster_config, parse_args
    from services.controller.cluster import gateway_config

    up = ["--mode", "aggregated", "--workers", "2", "--model", "/nonexistent/m",
          "--served-model-name", "m"]
    on = gateway_config(cluster_config(parse_args(["up", *up])), "redis://x", 1, 2)
    assert on.index_replica == IndexReplicaConfig() and on.registry_feed == RegistryFeedConfig()
    off = gateway_config(cluster_config(parse_args(["up", *up, "--no-index-replica",
                                                    "--no-registry-feed"])), "redis://x", 1, 2)
    assert off.index_replica is None and off.registry_feed is None
    f = tmp_path / "up.yaml"
    f.write_text("index_replica: false\nregistry_feed: false\n")
    cc = cluster_config(parse_args(["up", *up, "--config", str(f)]))
    assert cc.index_replica is None and cc.registry_feed is None
    f.write_text("index_replica: true\n")  # and a typed flag after the file wins
    cc = cluster_config(parse_args(["up", *up, "--config", str(f), "--no-index-replica"]))
    assert cc.index_replica is None and cc.registry_feed == RegistryFeedConfig()
