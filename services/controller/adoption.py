"""What a restarted controller finds of its cluster in Ray: the worker actors an earlier
controller created, and which of them it may adopt.

When `splitserve up` joins a Ray cluster (`--ray-address`), worker actors are detached: they
outlive the controller that created them (a controller crash, a container restart). The next
controller of the same namespace lists the named actors of its Ray namespace, asks each what it
is (WorkerActor.describe) and adopts the ones that fit its plan: same pool, same engine
settings, same Redis and namespace, the same cluster secret. The others are removed. Workers
are never adopted across namespaces (each cluster has its own Ray namespace).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import ray

from services.worker.config import EngineConfig, WorkerConfig

log = logging.getLogger(__name__)

ACTOR_PREFIX = "splitserve-"
"""Worker actors (and their placement groups) are named ACTOR_PREFIX + worker id."""
ADOPTABLE = frozenset({"created", "starting", "serving", "draining"})
"""The states WorkerActor.describe reports that can be adopted (not: stopped, failed)."""


def actor_name(worker_id: str) -> str:
    """The Ray name of a worker's actor and of its placement group."""
    return f"{ACTOR_PREFIX}{worker_id}"


@dataclass
class FoundWorker:
    """A worker actor found in Ray, with what it said of itself (None: it did not answer)."""

    name: str
    actor: Any
    description: dict | None = None
    error: str = ""

    @cached_property
    def config(self) -> WorkerConfig | None:
        if self.description is None:
            return None
        return WorkerConfig.model_validate_json(self.description["config"])

    @property
    def state(self) -> str:
        return self.description["state"] if self.description else "unresponsive"


def find_workers(timeout_s: float = 10.0) -> list[FoundWorker]:
    """Every live named worker actor of this Ray namespace, each described (in parallel)."""
    found: list[FoundWorker] = []
    for name in sorted(ray.util.list_named_actors(all_namespaces=False)):
        if not name.startswith(ACTOR_PREFIX):
            continue
        try:
            found.append(FoundWorker(name, ray.get_actor(name)))
        except ValueError:  # it died between the listing and the lookup
            continue
    refs = {w.actor.describe.remote(): w for w in found}
    if refs:
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in refs:
            w = refs[ref]
            if ref not in ready:
                w.error = f"did not answer within {timeout_s:.0f}s"
                ray.cancel(ref, force=False)
                continue
            try:
                w.description = ray.get(ref)
            except Exception as exc:  # dead actor, or one from before describe() existed
                w.error = f"{type(exc).__name__}: {exc}"
    return found


def refusal(found: FoundWorker, engines: dict[str, EngineConfig], redis_url: str,
            namespace: str, secret_fingerprint: str) -> str | None:
    """Why `found` cannot be adopted by a controller whose pools run `engines` (pool name ->
    engine settings) on `redis_url`/`namespace` with the secret of `secret_fingerprint`;
    None when it can."""
    if found.description is None:
        return f"no description ({found.error})"
    if found.state not in ADOPTABLE:
        return f"it is {found.state}"
    cfg = found.config
    assert cfg is not None
    pool = cfg.role.value
    if pool not in engines:
        return f"this cluster has no {pool} pool (pools: {', '.join(engines)})"
    if found.description.get("secret_fingerprint") != secret_fingerprint:
        return "it holds another cluster secret"
    if cfg.redis_url != redis_url or cfg.namespace != namespace:
        return "it publishes to another Redis or namespace"
    if cfg.engine != engines[pool]:
        want, have = engines[pool].model_dump(), cfg.engine.model_dump()
        changed = sorted(k for k in want if want[k] != have.get(k))
        return f"its engine settings differ ({', '.join(changed)})"
    return None


def placement_group_of(worker_id: str) -> Any:
    """The worker's placement group, or None when it has none."""
    try:
        return ray.util.get_placement_group(actor_name(worker_id))
    except ValueError:
        return None
