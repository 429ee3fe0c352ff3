"""The route stage's decisions equal those of a reference made from scratch at every decision.

The route stage keeps state between decisions so that a decision's work does not grow with
the pool (services/gateway/serving_pools.py: pools per registry snapshot, load-only snapshots
taken in one identity pass; the shortlist's load order following the in-flight counts that
moved; the dispatch ledger's pending prompts indexed by block hash). The reference here keeps
none of it: at each decision it filters the snapshot by role, state and exclusion, asks the
replica for every candidate, merges the prompts it saw sent (its own record), builds a fresh
load order, shortlists and filters the pool, and asks a twin kv policy. A seeded run of
routes, retries excluding workers, dispatches and completions, heartbeats (load-only
snapshots) and workers leaving, draining and coming back, on a real Redis and the gateway's
replica, in an aggregated and a disaggregated cluster: every decision, its cost and its
candidates must be the same."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.cost_model import queue_depth
from router.dispatch_ledger import DispatchLedger
from router.policies import KVPolicy, RouteRequest
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerLoad, WorkerRole, WorkerState
from router.replica_config import IndexReplicaConfig
from router.replicated_index import ReplicatedPrefixIndex, open_prefix_index
from router.scorers.cold_spread import AffinityRate
from router.shortlist import LoadOrder, shortlist
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET

NS = "stage-ref"
BS = 16


class Clock:
    """A clock the test moves (the ledger's and the affinity rate's)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _worker(wid: str, role: WorkerRole, rng: random.Random, now: float) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="127.0.0.1:1", model="m",
                      block_size=BS, hash_algo="sha256", hash_seed="0", load=_load(rng, now))


def _load(rng: random.Random, now: float) -> WorkerLoad:
    pending = rng.randrange(3)
    return WorkerLoad(num_running_reqs=rng.randrange(6), num_waiting_reqs=pending,
                      pending_prefill_reqs=pending, pending_prompt_tokens=pending * 200,
                      decoding_reqs=rng.randrange(6), kv_cache_usage=rng.random() * 0.8,
                      prefill_tokens_per_s=4000.0, step_s=0.02, step_per_seq_s=0.001,
                      updated_at=now)


class Reference:
    """The decision, made from scratch with a twin kv policy."""

    def __init__(self, stage: RouteStage, index: ReplicatedPrefixIndex, clock: Clock) -> None:
        self.stage = stage
        self.index = index
        self.policy = KVPolicy()
        self.policy.affinity = AffinityRate(self.policy.config.affinity_half_life_s, clock)
        self.hasher = BlockHasher(BS, "sha256", "0")
        self.sent: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # request -> prompts

    def pending(self, blocks: list[int], worker: str) -> int:
        held = {h for rid, ps in self.sent.items() for w, b in ps if w == worker for h in b}
        n = 0
        for h in blocks:
            if h not in held:
                break
            n += 1
        return n

    def route(self, tokens: list[int], exclude: frozenset[str]) -> tuple:
        d = self.stage.directory
        serving = [w for w in d.workers if w.state == WorkerState.SERVING]
        prefill = [w for w in serving if w.role == WorkerRole.PREFILL
                   and w.worker_id not in exclude]
        decode = [w for w in ([w for w in serving if w.role == WorkerRole.DECODE]
                              or [w for w in serving if w.role == WorkerRole.BOTH])
                  if w.worker_id not in exclude]
        blocks = self.hasher.block_hashes(tokens)
        ids = {w.worker_id for w in prefill + decode}
        cached = dict(self.index.replica.longest_prefixes(blocks, ids))
        for w in ids:
            if (n := self.pending(blocks, w)) > cached.get(w, 0):
                cached[w] = n
        cfg = self.policy.config
        pools = []
        for pool in (prefill, decode):
            if len(pool) <= cfg.shortlist_holders + cfg.shortlist_least_loaded:
                pools.append(pool)
                continue
            order = LoadOrder()
            for w in serving:
                if w.role == pool[0].role:
                    order.set(w.worker_id, queue_depth(w, d.in_flight))
            gone = sum(1 for wid in exclude if wid in order)
            keep = set(shortlist(cached, order, holders=cfg.shortlist_holders,
                                 least_loaded=cfg.shortlist_least_loaded + gone))
            pools.append([w for w in pool if w.worker_id in keep] or pool)
        prefill, decode = pools
        own = d.ledger.view({w.worker_id: w.load.updated_at for w in prefill + decode})
        got = self.policy.choose(prefill, decode, RouteRequest(
            num_tokens=len(tokens), cached_blocks=cached, in_flight=dict(d.in_flight), own=own))
        return _summary(got, tuple(blocks))


def _summary(d, blocks=None) -> tuple:
    return (d.decode.worker_id, d.prefill and d.prefill.worker_id, d.reason,
            d.predicted_cached_blocks, d.cost, sorted(c["worker"] for c in d.candidates),
            blocks if blocks is not None else d.prompt_blocks)


@pytest.mark.parametrize("disaggregated", [False, True])
async def test_the_stage_decides_as_a_reference_made_from_scratch(
        r: aioredis.Redis, disaggregated: bool) -> None:
    rng = random.Random(7 + disaggregated)
    clock = Clock()
    if disaggregated:
        roles = [WorkerRole.PREFILL] * 24 + [WorkerRole.DECODE] * 26
    else:
        roles = [WorkerRole.BOTH] * 50
    workers = [_worker(f"w{i:02d}", role, rng, clock.now) for i, role in enumerate(roles)]
    system = [rng.randrange(1, 50_000) for _ in range(3 * BS)]
    docs = [system + [rng.randrange(1, 50_000) for _ in range(5 * BS)] if i % 3 == 0
            else [rng.randrange(1, 50_000) for _ in range(8 * BS)] for i in range(12)]
    hasher = BlockHasher(BS, "sha256", "0")
    prefixes = PrefixIndex(r, NS)
    for doc in docs:
        hashes = hasher.block_hashes(doc)
        for w in rng.sample(workers, rng.randint(1, 3)):
            await prefixes.add_blocks(w.worker_id, hashes[:rng.randint(1, len(hashes))])
    for w in rng.sample(workers, 20):  # the system prompt, on many
        await prefixes.add_blocks(w.worker_id, hasher.block_hashes(system))
    index = await open_prefix_index(r, NS, IndexReplicaConfig())
    assert isinstance(index, ReplicatedPrefixIndex)
    directory = WorkerDirectory(r, NS, "m", TEST_SECRET)
    directory.ledger = DispatchLedger(clock=clock)
    stage = RouteStage(directory, KVPolicy(), index, GatewayMetrics(), hash_cache_blocks=64)
    stage.policy.affinity = AffinityRate(stage.policy.config.affinity_half_life_s, clock)
    ref = Reference(stage, index, clock)
    snapshot = list(workers)
    directory.take(snapshot)
    flying: list[tuple[str, list[str]]] = []
    gone: list[WorkerInfo] = []
    try:
        for step in range(300):
            clock.now += 0.01
            tokens = list(rng.choice(docs)) if rng.random() < 0.8 else \
                [rng.randrange(1, 50_000) for _ in range(rng.randint(1, 8) * BS + 3)]
            exclude = frozenset(w.worker_id for w in rng.sample(snapshot, 2)) \
                if rng.random() < 0.15 else frozenset()
            want = ref.route(tokens, exclude)
            got = await stage.route(tokens, exclude=exclude)
            assert _summary(got) == want, f"decision {step}"
            rid = f"r{step}"
            stage.sent(got, rid, len(tokens))
            ref.sent[rid] = [(got.computes.worker_id, got.prompt_blocks)]
            on = [w.worker_id for w in (got.prefill, got.decode) if w is not None]
            for wid in on:
                directory.in_flight[wid] += 1
            flying.append((rid, on))
            if len(flying) > 20 or (flying and rng.random() < 0.3):  # one ends
                done, was_on = flying.pop(rng.randrange(len(flying)))
                stage.ledger.finished(done)
                ref.sent.pop(done)
                for wid in was_on:
                    directory.in_flight[wid] -= 1
                    if directory.in_flight[wid] <= 0:
                        del directory.in_flight[wid]
            if step % 5 == 4:  # heartbeats: some workers' loads move (a load-only snapshot)
                snapshot = list(snapshot)
                for i in rng.sample(range(len(snapshot)), 6):
                    snapshot[i] = snapshot[i].model_copy(update={"load": _load(rng, clock.now)})
                directory.take(snapshot)
            if step % 23 == 22:  # a worker leaves, comes back or drains (or serves again)
                snapshot = list(snapshot)
                op = rng.randrange(3)
                if op == 0 and gone:
                    snapshot.insert(rng.randrange(len(snapshot)), gone.pop())
                elif op == 1:
                    gone.append(snapshot.pop(rng.randrange(len(snapshot))))
                else:
                    i = rng.randrange(len(snapshot))
                    state = (WorkerState.DRAINING if snapshot[i].state == WorkerState.SERVING
                             else WorkerState.SERVING)
                    snapshot[i] = snapshot[i].model_copy(update={"state": state})
                directory.take(snapshot)
    finally:
        await index.aclose()
