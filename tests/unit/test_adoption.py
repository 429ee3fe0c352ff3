"""Which worker actors a restarted controller adopts (services/controller/adoption.py): the
ones of its own pools, engine settings, Redis, namespace and cluster secret, alive and not
stopping; any difference is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.registry import WorkerRole
from services.cluster_secret import ClusterSecret
from services.controller.adoption import FoundWorker, actor_name, refusal
from services.worker.config import EngineConfig, WorkerConfig

SECRET = ClusterSecret.from_text("splitserve-unit-test-secret-0123456789")
REDIS = "redis://127.0.0.1:6379"
ENGINE = EngineConfig(model="/models/tiny", served_model_name="tiny")


def found(state: str = "serving", role: WorkerRole = WorkerRole.DECODE,
          engine: EngineConfig = ENGINE, secret: ClusterSecret = SECRET,
          redis_url: str = REDIS, namespace: str = "splitserve") -> FoundWorker:
    cfg = WorkerConfig(worker_id=f"{role.value}-0-abc123", role=role, engine=engine,
                       redis_url=redis_url, namespace=namespace, run_dir=Path("/tmp/run"),
                       cache_dir=Path("/tmp/cache"))
    return FoundWorker(actor_name(cfg.worker_id), actor=None, description={
        "config": cfg.model_dump_json(), "state": state, "endpoints": None,
        "secret_fingerprint": secret.fingerprint})


def why(f: FoundWorker, engines: dict[str, EngineConfig] | None = None) -> str | None:
    engines = engines or {"prefill": ENGINE, "decode": ENGINE}
    return refusal(f, engines, REDIS, "splitserve", SECRET.fingerprint)


@pytest.mark.parametrize("state", ["created", "starting", "serving", "draining"])
def test_a_worker_of_this_cluster_is_adopted_in_any_live_state(state: str) -> None:
    assert why(found(state)) is None


@pytest.mark.parametrize("state", ["stopped", "failed"])
def test_a_stopping_or_failed_worker_is_not(state: str) -> None:
    assert why(found(state)) == f"it is {state}"


def test_one_that_did_not_answer_is_not() -> None:
    f = FoundWorker("splitserve-decode-0-abc", actor=None, error="did not answer within 10s")
    assert why(f) == "no description (did not answer within 10s)"


def test_differences_are_refused_with_their_reason() -> None:
    assert why(found(role=WorkerRole.BOTH)) == (
        "this cluster has no both pool (pools: prefill, decode)")
    other = ClusterSecret.from_text("another-cluster-secret-0123456789abc")
    assert why(found(secret=other)) == "it holds another cluster secret"
    assert why(found(redis_url="redis://10.0.0.1:6379")) == (
        "it publishes to another Redis or namespace")
    assert why(found(namespace="other")) == "it publishes to another Redis or namespace"
    changed = ENGINE.model_copy(update={"max_model_len": 1024, "engine_args": {"seed": 1}})
    assert why(found(engine=changed)) == (
        "its engine settings differ (engine_args, max_model_len)")


def test_the_fingerprint_names_the_secret_without_giving_it_away() -> None:
    fp = SECRET.fingerprint
    assert fp == ClusterSecret.from_text(SECRET.text).fingerprint and len(fp) == 16
    assert fp not in SECRET.text and fp not in SECRET.grpc_token
    assert fp != ClusterSecret.from_text("another-cluster-secret-0123456789abc").fingerprint
