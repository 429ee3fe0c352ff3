"""The prefix index against a brute-force oracle, on one Redis and on a real Redis Cluster.

A seeded random run drives six workers' engines: BlockStored of random prefixes of shared
chained "documents", BlockRemoved of random held blocks, AllBlocksCleared, event gaps (the
updater's Resync), worker deaths (alive key deleted, or expired by its TTL) and restarts
(a new life clears its old entries), purges and sweeps, gateway restarts (a fresh reader),
and on the cluster a primary failover (a replica promoted with CLUSTER FAILOVER). Events go
through the real :class:`~router.index_updater.IndexUpdater` logic. After every step, lookups
of random prompts from a separate reader must equal the oracle's longest cached prefix of
every live candidate: in particular they never over-report.

The gateway's replica (router/index_replica.py) is driven the same way by hypothesis, on both,
with gateway restarts and (cluster) graceful failovers: it never reports more than a state of
the last staleness bound did, and converges to the oracle within it. Last, a primary is killed
outright while engines write and the replica serves lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ReadOnlyError

from router.index_replica import IndexReplica, IndexReplicaConfig
from router.index_updater import IndexUpdater, IndexUpdaterConfig
from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Resync, SubscriberConfig
from router.prefix_index import PrefixIndex
from router.redis_client import UNAVAILABLE_ERRORS
from router.replicated_index import open_prefix_index
from tests.support.redis import RedisServer, redis_server
from tests.support.redis_cluster import RedisClusterServer, redis_cluster

NS = "splitserve"
WORKERS = [f"w{i}" for i in range(6)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    """3 primaries + 3 replicas for the module."""
    with redis_cluster(3, 1) as c:
        yield c


@pytest.fixture(scope="module")
def single() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@contextlib.asynccontextmanager
async def client(kind: str, single: RedisServer, cluster: RedisClusterServer
                 ) -> AsyncIterator[aioredis.Redis | RedisCluster]:
    if kind == "cluster":
        c: aioredis.Redis | RedisCluster = RedisCluster.from_url(cluster.url)
        for attempt in range(50):  # right after a failover, a node's view may lag a moment
            try:
                await c.flushall(target_nodes=RedisCluster.PRIMARIES)
                break
            except ReadOnlyError:
                assert attempt < 49
                await asyncio.sleep(0.1)
                await c.nodes_manager.initialize()
    else:
        c = aioredis.Redis.from_url(single.url)
        await c.flushall()
    try:
        yield c
    finally:
        await c.aclose()


class Oracle:
    """What each engine holds and who is alive: the ground truth."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {w: set() for w in WORKERS}
        self.alive: dict[str, bool] = dict.fromkeys(WORKERS, False)

    def longest(self, prompt: list[int], candidates: list[str]) -> dict[str, int]:
        out = {}
        for w in dict.fromkeys(candidates):
            if not self.alive[w]:
                continue
            n = 0
            while n < len(prompt) and prompt[n] in self.held[w]:
                n += 1
            out[w] = n
        return out


def _updater(index: PrefixIndex, w: str) -> IndexUpdater:
    return IndexUpdater(index, IndexUpdaterConfig(
        worker_id=w, subscriber=SubscriberConfig(endpoint="ipc:///nonexistent"), audit_interval_s=0))


async def _failover(cluster: RedisClusterServer) -> None:
    primary = cluster.primaries()[0]
    replica = cluster.replica_of(primary)
    with contextlib.closing(cluster.node(replica)) as c:
        c.execute_command("CLUSTER", "FAILOVER")  # graceful: the replica catches up first
    deadline = time.monotonic() + 20
    while replica not in cluster.primaries():
        assert time.monotonic() < deadline, "replica not promoted"
        await asyncio.sleep(0.1)
    cluster.wait_ok()


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_lookups_match_a_brute_force_oracle(kind: str, single: RedisServer,
                                                  cluster: RedisClusterServer) -> None:
    rng = random.Random(18)
    docs = [[rng.getrandbits(64) for _ in range(24)] for _ in range(12)]
    for d in docs[6:]:  # half the documents share a 6-block "system prompt"
        d[:6] = docs[0][:6]
    oracle = Oracle()
    async with client(kind, single, cluster) as r:
        # bucket_bits=8: few buckets, so members of many workers and blocks share them
        writer = PrefixIndex(r, NS, bucket_bits=8)
        readers = [PrefixIndex(r, NS, bucket_bits=8)]
        updaters = {w: _updater(writer, w) for w in WORKERS}

        async def live(w: str) -> None:
            await r.sadd(f"{NS}:workers", w)
            await r.set(f"{NS}:worker:{w}:alive", "1", px=60_000)
            oracle.alive[w] = True

        for w in WORKERS:
            await live(w)
        checks = over = 0
        failed_over = False
        for step in range(400):
            w = rng.choice(WORKERS)
            u = updaters[w]
            op = rng.random()
            if op < 0.67 and not oracle.alive[w]:
                op = 0.75  # a dead worker publishes nothing: restart it instead
            if op < 0.45:  # a prompt's blocks computed: a prefix of a document, maybe extended
                d = rng.choice(docs)
                n = rng.randint(1, len(d))
                events = [BlockStored(block_hashes=d[:n])]
                if rng.random() < 0.3 and oracle.held[w]:
                    gone = rng.sample(sorted(oracle.held[w]), rng.randint(1, min(4, len(oracle.held[w]))))
                    events.append(BlockRemoved(block_hashes=gone))
                if rng.random() < 0.05:
                    events.insert(rng.randrange(len(events) + 1), AllBlocksCleared())
                await u.handle(EventBatch(step, 0.0, events))
                for e in events:
                    if isinstance(e, BlockStored):
                        oracle.held[w].update(e.block_hashes)  # type: ignore[arg-type]
                    elif isinstance(e, BlockRemoved):
                        oracle.held[w].difference_update(e.block_hashes)  # type: ignore[arg-type]
                    else:
                        oracle.held[w].clear()
            elif op < 0.62 and oracle.held[w]:  # evictions
                gone = rng.sample(sorted(oracle.held[w]), rng.randint(1, len(oracle.held[w])))
                await u.handle(EventBatch(step, 0.0, [BlockRemoved(block_hashes=gone)]))
                oracle.held[w].difference_update(gone)
            elif op < 0.67:  # a gap in the event stream: the updater forgets and clears
                await u.handle(Resync("gap", step, step + 2))
                oracle.held[w].clear()
            elif op < 0.74 and oracle.alive[w]:  # the worker dies; its entries stay in Redis
                if rng.random() < 0.5:
                    await r.delete(f"{NS}:worker:{w}:alive")
                else:  # ... or its alive key simply expires
                    await r.pexpire(f"{NS}:worker:{w}:alive", 1)
                    await asyncio.sleep(0.005)
                oracle.alive[w] = False
            elif op < 0.80 and not oracle.alive[w]:  # restart: a new life clears on start
                updaters[w] = u = _updater(writer, w)
                await writer.clear_worker(w)
                await live(w)
                oracle.held[w].clear()
            elif op < 0.84:  # a gateway purges the dead and sweeps retired epochs
                await rng.choice(readers).purge_dead()
            elif op < 0.86:  # a gateway restarts: a fresh reader, nothing cached
                readers = [*readers[-1:], PrefixIndex(r, NS, bucket_bits=8)]
            elif kind == "cluster" and not failed_over and step > 200:
                await _failover(cluster)
                failed_over = True
            for _ in range(3):
                d = rng.choice(docs)
                prompt = d[: rng.randint(1, len(d))] + ([rng.getrandbits(64)] if rng.random() < 0.2 else [])
                cands = rng.sample(WORKERS, rng.randint(1, len(WORKERS)))
                for reader in readers:
                    got = await reader.longest_prefixes(prompt, cands)
                    want = oracle.longest(prompt, cands)
                    over += sum(1 for k, v in got.items() if v > want.get(k, -1))
                    assert got == want, (step, got, want)
                    checks += 1
        assert checks >= 1200 and over == 0
        assert kind == "single" or failed_over
        # the exact per-worker counts, and after purging the dead and a sweep, no member of a
        # retired epoch is left anywhere
        for w in WORKERS:
            if oracle.alive[w]:
                assert await writer.worker_block_count(w) == len(oracle.held[w])
        await readers[-1].purge_dead()
        # a set: right after a failover the client may still list the old primary with the new
        # one, and scan both
        keys = {k async for k in r.scan_iter(match=writer.bucket_pattern(), count=1000)}
        total = 0
        for k in keys:
            total += await r.zcard(k)
        assert total == sum(len(oracle.held[w]) for w in WORKERS if oracle.alive[w])
        for x in (writer, *readers):
            await x.aclose()


async def test_liveness_cache_drops_an_expired_worker_on_time(cluster: RedisClusterServer) -> None:
    """With liveness_cache_s, a worker whose alive key expires stops counting when it expires,
    though the reader reads no alive key while the cached TTL lasts."""
    async with client("cluster", None, cluster) as r:  # type: ignore[arg-type]
        writer = PrefixIndex(r, NS)
        reader = PrefixIndex(r, NS, liveness_cache_s=5.0)
        await r.set(f"{NS}:worker:a:alive", "1", px=60_000)
        await r.set(f"{NS}:worker:b:alive", "1", px=400)
        for w in ("a", "b"):
            await writer.add_blocks(w, [1, 2, 3])
        assert await reader.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 3}
        assert reader.nodes._clients  # the lookup went out as plain per-node pipelines
        await asyncio.sleep(0.5)
        assert await reader.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 3}
        # a clear anywhere bumps the epoch map's version: the reader re-reads it at once
        await writer.clear_worker("a", [1, 2, 3])
        assert await reader.longest_prefixes([1, 2, 3], ["a"]) == {"a": 0}
        await reader.aclose()
        await writer.aclose()


# -- the gateway replica against the oracle (hypothesis) -----------------------------------------

REPLICA_BOUND_S = 1.0  # IndexReplicaConfig.max_staleness_s in these tests
DOCS = 6
DOC_LEN = 10

_store = st.tuples(st.just("store"), st.sampled_from(WORKERS), st.integers(0, DOCS - 1),
                   st.integers(1, DOC_LEN))
_evict = st.tuples(st.just("evict"), st.integers(0, 2**16), st.integers(1, 6))
ops_strategy = st.lists(st.one_of(
    _store, _store, _store, _evict, _evict,
    st.tuples(st.just("clear"), st.sampled_from(WORKERS)),
    st.tuples(st.just("gap"), st.sampled_from(WORKERS)),
    st.tuples(st.just("die"), st.sampled_from(WORKERS)),
    st.tuples(st.just("restart"), st.sampled_from(WORKERS)),
    st.just(("purge",)),
    st.just(("gateway_restart",)),
    st.just(("failover",)),
), min_size=4, max_size=30)


class History:
    """The oracle's states over time: a replica may lag behind, but only within the bound."""

    def __init__(self) -> None:
        self.states: list[tuple[float, dict[str, set[int]], set[str]]] = []

    def record(self, oracle: Oracle) -> None:
        self.states.append((time.monotonic(), {w: set(h) for w, h in oracle.held.items()},
                            {w for w, a in oracle.alive.items() if a}))

    def most(self, prompt: list[int], at: float) -> dict[str, int]:
        """Per worker, the longest prefix any state of the last REPLICA_BOUND_S reported."""
        out: dict[str, int] = {}
        for i, (start, held, alive) in enumerate(self.states):
            end = self.states[i + 1][0] if i + 1 < len(self.states) else at
            if end < at - REPLICA_BOUND_S:
                continue
            for w in alive:
                n = 0
                while n < len(prompt) and prompt[n] in held[w]:
                    n += 1
                out[w] = max(out.get(w, 0), n)
        return out


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_replica_never_over_reports_and_converges(kind: str, single: RedisServer,
                                                  cluster: RedisClusterServer) -> None:
    """Random BlockStored/BlockRemoved/AllBlocksCleared, event gaps, worker deaths and
    restarts, purges, gateway restarts (a new replica warms from Redis) and, on the cluster,
    primary failovers: after every step a replica's lookup never reports more than some state
    of the last REPLICA_BOUND_S did, and within that bound it equals the oracle exactly."""
    failovers = [0]
    rng0 = random.Random(5)
    docs = [[rng0.getrandbits(64) for _ in range(DOC_LEN)] for _ in range(DOCS)]
    for d in docs[3:]:  # half the documents share a 3-block "system prompt"
        d[:3] = docs[0][:3]

    @settings(max_examples=12 if kind == "cluster" else 20, deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(ops=ops_strategy, seed=st.integers(0, 2**16))
    def run(ops: list[tuple], seed: int) -> None:
        asyncio.run(_replica_program(kind, single, cluster, docs, ops, seed, failovers))

    run()
    if kind == "cluster":
        assert failovers[0] >= 1


async def _replica_program(kind: str, single: RedisServer, cluster: RedisClusterServer,
                           docs: list[list[int]], ops: list[tuple], seed: int,
                           failovers: list[int]) -> None:
    rng = random.Random(seed)
    oracle = Oracle()
    history = History()
    cfg = IndexReplicaConfig(max_staleness_s=REPLICA_BOUND_S, retry_s=0.05)
    async with client(kind, single, cluster) as r:
        writer = PrefixIndex(r, NS, bucket_bits=6, partitions=3)
        updaters = {w: _updater(writer, w) for w in WORKERS}
        for w in WORKERS:
            await r.set(f"{NS}:worker:{w}:alive", "1", px=60_000)
            oracle.alive[w] = True
        await writer.add_blocks(WORKERS[0], docs[0][:2])
        oracle.held[WORKERS[0]].update(docs[0][:2])
        rep = IndexReplica(PrefixIndex(r, NS, bucket_bits=6, partitions=3), cfg)
        await rep.start()
        history.record(oracle)
        try:
            for op in ops:
                rep = await _step(op, r, writer, updaters, oracle, rep, cfg, rng, kind,
                                  cluster, failovers, docs)
                history.record(oracle)
                prompts = [d[: rng.randint(1, DOC_LEN)] for d in docs]
                alive = {w for w, a in oracle.alive.items() if a}
                now = time.monotonic()
                for p in prompts:  # at once: never more than a state of the last bound
                    got = rep.longest_prefixes(p, alive)
                    most = history.most(p, now)
                    assert all(v <= most.get(w, 0) for w, v in got.items()), (op, got, most)
                deadline = time.monotonic() + REPLICA_BOUND_S + (8.0 if kind == "cluster" else 0)
                while True:  # and soon exactly what the engines hold
                    want = [{w: n for w, n in oracle.longest(p, sorted(alive)).items() if n}
                            for p in prompts]
                    got_all = [rep.longest_prefixes(p, alive) for p in prompts]
                    if got_all == want:
                        break
                    assert time.monotonic() < deadline, (op, got_all, want)
                    await asyncio.sleep(0.01)
        finally:
            await rep.stop()
            await rep.index.aclose()
            await writer.aclose()


async def _step(op: tuple, r, writer: PrefixIndex, updaters: dict, oracle: Oracle,
                rep: IndexReplica, cfg: IndexReplicaConfig, rng: random.Random, kind: str,
                cluster: RedisClusterServer, failovers: list[int], docs: list[list[int]]
                ) -> IndexReplica:
    name, *a = op
    if name == "evict":  # blocks of a worker that holds some (the first int picks which)
        holding = [w for w in WORKERS if oracle.held[w] and oracle.alive[w]]
        if not holding:
            return rep
        a[0] = holding[a[0] % len(holding)]
    if name in ("store", "clear", "gap") and not oracle.alive[a[0]]:
        name = "restart"  # a dead worker publishes nothing: restart it instead
    if name == "store":
        w, d, n = a
        doc = docs[d]
        await updaters[w].handle(EventBatch(0, 0.0, [BlockStored(block_hashes=doc[:n])]))
        oracle.held[w].update(doc[:n])
    elif name == "evict":
        w, k = a
        held = sorted(oracle.held[w])
        if held:
            gone = rng.sample(held, min(k, len(held)))
            await updaters[w].handle(EventBatch(0, 0.0, [BlockRemoved(block_hashes=gone)]))
            oracle.held[w].difference_update(gone)
    elif name == "clear":
        w = a[0]
        await updaters[w].handle(EventBatch(0, 0.0, [AllBlocksCleared()]))
        oracle.held[w].clear()
    elif name == "gap":
        w = a[0]
        await updaters[w].handle(Resync("gap", 1, 3))
        oracle.held[w].clear()
    elif name == "die":
        w = a[0]
        await r.delete(f"{NS}:worker:{w}:alive")
        oracle.alive[w] = False
    elif name == "restart":
        w = a[0]
        updaters[w] = _updater(writer, w)
        await writer.clear_worker(w)
        await r.set(f"{NS}:worker:{w}:alive", "1", px=60_000)
        oracle.held[w].clear()
        oracle.alive[w] = True
    elif name == "purge":
        await writer.purge_dead()
    elif name == "gateway_restart":
        await rep.stop()
        await rep.index.aclose()
        rep = IndexReplica(PrefixIndex(r, NS, bucket_bits=6, partitions=3), cfg)
        await rep.start()
    elif name == "failover" and kind == "cluster" and failovers[0] < 3:
        await _failover(cluster)
        failovers[0] += 1
    return rep


async def test_a_crashed_primary_is_survived(cluster: RedisClusterServer) -> None:
    """A shard's primary is killed (SIGKILL) while engines publish and gateways route: its
    replica is promoted; the gateway replica never fails a lookup nor reports more than some
    state of the last bound did (it reports less, or nothing: routing on load, for a moment);
    writers rebuild their entries; afterwards the replica and Redis lookups are exact again."""
    rng = random.Random(4)
    docs = [[rng.getrandbits(64) for _ in range(DOC_LEN)] for _ in range(DOCS)]
    oracle = Oracle()
    history = History()
    async with client("cluster", None, cluster) as r:  # type: ignore[arg-type]
        writer = PrefixIndex(r, NS, bucket_bits=6, partitions=3)
        reader = PrefixIndex(r, NS, bucket_bits=6, partitions=3)
        updaters = {w: _updater(writer, w) for w in WORKERS}
        for w in WORKERS:
            await r.set(f"{NS}:worker:{w}:alive", "1", px=120_000)
            oracle.alive[w] = True
            await updaters[w].handle(EventBatch(0, 0.0, [BlockStored(block_hashes=docs[0][:4])]))
            oracle.held[w].update(docs[0][:4])
        rep = IndexReplica(PrefixIndex(r, NS, bucket_bits=6, partitions=3),
                           IndexReplicaConfig(max_staleness_s=REPLICA_BOUND_S, retry_s=0.1))
        await rep.start()
        history.record(oracle)
        victim = _port_of(cluster, writer.layout.log_key(0))
        cluster.wait_replicated()  # a replica that never synced would not take over
        cluster.kill(victim)
        alive = set(WORKERS)
        redis_failures = lookups = rebuilds = 0
        outage_end = time.monotonic() + 60
        recovered_at: float | None = None
        try:
            while recovered_at is None or time.monotonic() < recovered_at + 1.0:
                assert time.monotonic() < outage_end, "the cluster did not recover"
                w = rng.choice(WORKERS)
                u = updaters[w]
                if rng.random() < 0.6:
                    d = rng.choice(docs)
                    batch = [BlockStored(block_hashes=d[: rng.randint(1, DOC_LEN)])]
                    oracle.held[w].update(batch[0].block_hashes)  # type: ignore[arg-type]
                else:
                    gone = rng.sample(sorted(oracle.held[w]), min(2, len(oracle.held[w])))
                    batch = [BlockRemoved(block_hashes=gone)]
                    oracle.held[w].difference_update(gone)
                history.record(oracle)
                try:  # what IndexUpdater.run does: a failed write rebuilds from the mirror
                    await u.handle(EventBatch(0, 0.0, batch))
                except UNAVAILABLE_ERRORS:
                    await u._rebuild_with_retry()
                    rebuilds += 1
                now = time.monotonic()
                for d in docs:
                    got = rep.longest_prefixes(d, alive)  # never raises
                    most = history.most(d, now)
                    assert all(v <= most.get(x, 0) for x, v in got.items()), (got, most)
                    lookups += 1
                try:
                    await reader.longest_prefixes(docs[0], WORKERS)
                except UNAVAILABLE_ERRORS:
                    redis_failures += 1  # the gateway routes on load only meanwhile
                if recovered_at is None and rebuilds and _promoted(cluster, victim):
                    recovered_at = time.monotonic()
                await asyncio.sleep(0.02)
            assert rebuilds > 0 and lookups > 0
            deadline = time.monotonic() + REPLICA_BOUND_S + 10
            while True:  # exact again: the replica, and the index itself
                want = [{w: n for w, n in oracle.longest(d, WORKERS).items() if n} for d in docs]
                got_all = [rep.longest_prefixes(d, alive) for d in docs]
                if got_all == want:
                    break
                assert time.monotonic() < deadline, (got_all, want)
                await asyncio.sleep(0.05)
            for d in docs:
                assert await reader.longest_prefixes(d, WORKERS) == oracle.longest(d, WORKERS)
            assert rep.stats.errors > 0
        finally:
            await rep.stop()
            await rep.index.aclose()
            for x in (writer, reader):
                await x.aclose()
            cluster.restart(victim)  # rejoins as a replica of the promoted node
            cluster.wait_ok()


def _port_of(cluster: RedisClusterServer, key: str) -> int:
    import redis as sync_redis

    with contextlib.closing(sync_redis.RedisCluster(host=cluster.host, port=cluster.ports[0])) as c:
        return c.get_node_from_key(key).port


def _promoted(cluster: RedisClusterServer, victim: int) -> bool:
    """Whether every running node reports the cluster ok without the victim."""
    try:
        cluster.wait_ok(timeout_s=0.01)
        return True
    except RuntimeError:
        return False


async def test_the_index_on_a_redis_cluster_beside_a_single_redis_registry(
        single: RedisServer, cluster: RedisClusterServer, monkeypatch) -> None:
    """What the chart's redis.index.url sets up: SPLITSERVE_REDIS_INDEX_URL (+ _CLUSTER) puts
    the index (and a gateway's replica) on a Redis Cluster; the registry stays put."""
    monkeypatch.setenv("SPLITSERVE_REDIS_INDEX_URL", cluster.url)
    monkeypatch.setenv("SPLITSERVE_REDIS_INDEX_CLUSTER", "true")
    async with client("cluster", single, cluster) as rc, client("single", single, cluster) as r:
        await r.set(f"{NS}:worker:w0:alive", "1", px=60_000)
        idx = await open_prefix_index(r, NS, IndexReplicaConfig())
        try:
            assert isinstance(idx.redis, RedisCluster) and idx.registry is r
            await idx.add_blocks("w0", [1, 2, 3])
            deadline = time.monotonic() + 5
            while await idx.longest_prefixes([1, 2, 3, 4], ["w0", "w1"]) != {"w0": 3}:
                assert time.monotonic() < deadline  # the replica has it soon
                await asyncio.sleep(0.01)
            assert await PrefixIndex(rc, NS, registry=r).longest_prefixes(
                [1, 2, 3], ["w0", "w1"]) == {"w0": 3}  # from Redis: w1 has no alive key
            assert await PrefixIndex(rc, NS).workers_holding(2) == {"w0"}
            assert await r.keys(f"*{NS}:kv*") == []  # nothing of the index on the registry's
        finally:
            await idx.aclose()
