"""The prefix index at fleet scale (`python -m bench.index_scale`; not a test).

Starts a local Redis Cluster (`--primaries` x (1 + `--replicas`) redis-servers) and a single
Redis. On the cluster it builds the index (router/prefix_index.py) of `--workers` workers and
`--blocks` indexed blocks; on the single Redis, today's single-Redis Lua index
(bench/index_baseline.py) as the baseline (with at most `--baseline-blocks`: it needs ~190-280
bytes per pair). Then, for each:

- writes: `--writer-procs` processes publish engine steps for the simulated workers as fast as
  the index absorbs them (a step: `--step-stored` BlockStored + as many BlockRemoved, one
  `apply` per step); reported as block events/s, per shard, and per Redis CPU-second of a shard
  (INFO cpu deltas: what one shard core absorbs, independent of this machine's load). On the
  cluster one gateway replica follows the change logs meanwhile: its CPU per change applied
  and its lag (a change's write to its application) under saturated writes;
- routing: `--router-procs` gateway processes make routing decisions while one writer keeps
  publishing at `--background-rate` block events/s. Paths:
    * `baseline`: today's gateway before the fleet-scale work: hash every block of a
      `--prompt-blocks`-block prompt with vLLM's algorithm, the Lua lookup of every worker,
      the kv policy (router/policies.py) scores all of them, the dispatch noted;
    * `redis` and `replica`: the gateway's own route stage (services/gateway/route_stage.py
      `RouteStage.route`, then `sent` and the decode worker's in-flight count: its worker
      directory, serving pools, prefix lookup, dispatch ledger, shortlist and kv policy, with
      a digest cache of `--hash-cache` blocks); `redis` asks the new index on the cluster
      (one pipeline per shard); `replica` warms a local replica from the cluster
      (router/replicated_index.py) that follows the change logs: no round trip. Each gateway
      has 256 requests in flight (first token 16 decisions after their dispatch, end 256
      after: ledger and counts updated), and its directory takes a registry snapshot every
      50 ms with the workers whose heartbeat (once a second) is due carrying a new load, as a
      registry feed hands them over.
  Reported: decisions per CPU-second of the gateway process (its replica's upkeep and the
  registry changes included; the workload's own prompt generation left out), decision p50/p99
  (route + dispatch noted), lookup p50/p99 (baseline: the Lua call; new paths: the route
  stage's hash + lookup + pending prefixes), the replica's lag p50/p99, warm-up time and
  memory;
- following alone (cluster): one replica follows while one writer publishes at
  `--background-rate` and nothing else runs: its lag without the other phases' contention
  for this machine's cores;
- memory: bytes per (block, worker) pair from INFO used_memory (primaries only), change logs
  trimmed (their fixed size is reported apart).

Prints a table and writes JSON (`--json`, default bench/results/index_scale.json) with every
figure and the new/baseline ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bench import json_text
from bench.index_baseline import LegacyPrefixIndex
from bench.redis_cluster import redis_cluster
from router.block_hash import BlockHasher
from router.index_replica import IndexReplica, IndexReplicaConfig
from router.kv_events import BlockRemoved, BlockStored
from router.policies import KVPolicy, RouteRequest
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerLoad, WorkerRole
from router.replicated_index import ReplicatedPrefixIndex
from services.cluster_secret import ClusterSecret
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage
from services.gateway.worker_directory import FEED_VIEW_S, WorkerDirectory

NS = "bench"
BLOCK_SIZE = 16


# -- workload ------------------------------------------------------------------------------------

def _workers(n: int) -> list[str]:
    return [f"worker-{i:05d}" for i in range(n)]


def _hot_docs(args: argparse.Namespace) -> list[list[int]]:
    """Token lists of the prompts routers look up (the first `--shared-blocks` blocks of 30%
    of them are one shared system prompt)."""
    rng = random.Random(7)
    n_tokens = args.prompt_blocks * BLOCK_SIZE
    system = [rng.randrange(0, 150_000) for _ in range(args.shared_blocks * BLOCK_SIZE)]
    docs = []
    for i in range(args.hot_docs):
        doc = [rng.randrange(0, 150_000) for _ in range(n_tokens)]
        if i % 10 < 3:
            doc[: len(system)] = system
        docs.append(doc)
    return docs


def _infos(workers: list[str], seed: int) -> dict[str, WorkerInfo]:
    """Aggregated workers with measured speeds and some load, as heartbeats publish them."""
    rng = random.Random(seed)
    out = {}
    for w in workers:
        pending = rng.randrange(4)
        out[w] = WorkerInfo(worker_id=w, role=WorkerRole.BOTH, address="127.0.0.1:1",
                            model="bench", load=WorkerLoad(
                                num_running_reqs=rng.randrange(8), num_waiting_reqs=pending,
                                in_flight=pending, pending_prefill_reqs=pending,
                                pending_prompt_tokens=pending * 1024, decoding_reqs=rng.randrange(8),
                                kv_cache_usage=rng.random() * 0.8, prefill_tokens_per_s=8000.0,
                                step_s=0.02, step_per_seq_s=0.001, updated_at=time.time()))
    return out


def _bucket_bits(pairs: int) -> int:
    """Buckets of ~64 members on average: listpack-encoded (zset-max-listpack-entries 128)."""
    return max(8, min(24, (max(pairs // 64, 1)).bit_length()))


def _make_index(kind: str, client: Any, args: argparse.Namespace | dict, bits: int) -> Any:
    if kind == "baseline":
        return LegacyPrefixIndex(client, NS)
    parts = args["partitions"] if isinstance(args, dict) else args.partitions
    return PrefixIndex(client, NS, bucket_bits=bits, partitions=parts, liveness_cache_s=1.0)


def _client(kind: str, url: str, **kw: Any) -> Any:
    kw.setdefault("socket_timeout", 60)  # this 2-core machine may be very busy
    if kind in ("baseline", "single"):
        return aioredis.Redis.from_url(url, **kw)
    return RedisCluster.from_url(url, **kw)


async def _populate(kind: str, url: str, args: argparse.Namespace, blocks: int,
                    bits: int) -> dict[str, Any]:
    """Register the workers, index the hot documents (through `add_blocks`) and filler blocks
    (new index: bulk-loaded bucket by bucket, then the change logs trimmed)."""
    client = _client(kind, url, max_connections=64)
    idx = _make_index(kind, client, args, bits)
    workers = _workers(args.workers)
    async with client.pipeline(transaction=False) as pipe:
        for w in workers:
            pipe.sadd(f"{NS}:workers", w)
            pipe.set(f"{NS}:worker:{w}:alive", "1", px=3_600_000)
        await pipe.execute()
    rng = random.Random(3)
    hasher = BlockHasher(BLOCK_SIZE, "sha256", hash_seed="0")
    per_worker: dict[str, list[int]] = {w: [] for w in workers}
    shared = set(rng.sample(workers, min(args.shared_holders, len(workers))))
    pairs = 0
    hot_blocks = 0
    for i, doc in enumerate(_hot_docs(args)):
        hashes = hasher.block_hashes(doc)
        hot_blocks += len(hashes)
        holders = rng.sample(workers, rng.randint(1, 4))
        for w in holders:
            depth = rng.randint(1, len(hashes))
            per_worker[w].extend(hashes[:depth])
            pairs += depth
        if i % 10 < 3:
            for w in shared.difference(holders):
                per_worker[w].extend(hashes[: args.shared_blocks])
                pairs += args.shared_blocks
    filler = max(blocks - hot_blocks, 0)
    start = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def add(w: str, hs: list[int]) -> None:
        async with sem:
            await idx.add_blocks(w, hs)

    await asyncio.gather(*[add(w, hs) for w, hs in per_worker.items() if hs])
    if kind == "baseline":
        chunk = 20_000
        done = 0
        while done < filler:
            n = min(chunk, filler - done)
            await add(workers[(done // chunk) % len(workers)],
                      [rng.getrandbits(64) for _ in range(n)])
            done += n
    else:
        await _bulk_fill(idx, workers, filler, rng)
        logs = [idx.layout.log_key(p) for p in range(idx.layout.partitions)]
        await idx.nodes.run([("XTRIM", k, "MAXLEN", 0) for k in logs])
    pairs += filler
    elapsed = time.perf_counter() - start
    if kind != "baseline":
        await idx.aclose()
    await client.aclose()
    return {"pairs": pairs, "blocks": hot_blocks + filler, "populate_s": round(elapsed, 1),
            "populate_pairs_per_s": round(pairs / elapsed)}


async def _bulk_fill(idx: PrefixIndex, workers: list[str], filler: int, rng: random.Random
                     ) -> None:
    """`filler` random blocks spread evenly over the buckets, round robin over the workers:
    one ZADD per bucket, per-node pipelines (what the writes would leave, much faster)."""
    cids = [await idx.epoch(w) for w in workers]
    layout = idx.layout
    nb = 2 ** layout.bucket_bits
    per, extra = divmod(filler, nb)
    low = (1 << layout.shift) - 1
    k = 0
    cmds: list[tuple] = []
    for b in range(nb):
        n = per + (1 if b < extra else 0)
        if not n:
            continue
        members = []
        for _ in range(n):
            h = (b << layout.shift) | (rng.getrandbits(64) & low)
            members += (0, f"{h:016x}{cids[k % len(cids)]}")
            k += 1
        cmds.append(("ZADD", layout.bucket_key(b << layout.shift), *members))
        if len(cmds) >= 500:
            await idx.nodes.run(cmds, writes=True)
            cmds = []
        if b and b % (nb // 8 or 1) == 0:
            print(f"  filler: {k:,}/{filler:,}", file=sys.stderr, flush=True)
    if cmds:
        await idx.nodes.run(cmds, writes=True)


# -- node statistics ---------------------------------------------------------------------------

def _primary_stats(ports: list[int]) -> dict[int, dict[str, float]]:
    out = {}
    for p in ports:
        c = redis.Redis(port=p)
        try:
            if c.info("replication")["role"] != "master":
                continue
            cpu, mem = c.info("cpu"), c.info("memory")
            out[p] = {"cpu": cpu["used_cpu_sys"] + cpu["used_cpu_user"],
                      "mem": mem["used_memory"]}
        finally:
            c.close()
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pct(xs: list[float], q: float, scale: float = 1e3) -> float | None:
    xs = sorted(xs)
    return round(xs[min(int(len(xs) * q), len(xs) - 1)] * scale, 3) if xs else None


# -- processes -----------------------------------------------------------------------------------

def _writer_proc(kind: str, url: str, args: dict, seed: int, seconds: float, rate: float,
                 workers: list[str], bits: int, go: Any, out: Any) -> None:
    """Publish engine steps for `workers` (round robin) for `seconds`; `rate` > 0 caps block
    events/s, 0 is as fast as the index absorbs them."""

    async def main() -> dict[str, float]:
        client = _client(kind, url, max_connections=32)
        idx = _make_index(kind, client, args, bits)
        rng = random.Random(seed)
        held: dict[str, list[int]] = {w: [] for w in workers}
        events = 0
        k = args["step_stored"]
        if kind != "baseline":
            for w in workers:  # epochs read once, one at a time (not timed)
                await idx.epoch(w)
        if go is not None:
            go.wait()
        stop = time.perf_counter() + seconds
        start = time.perf_counter()

        async def one(w: str) -> int:
            new = [rng.getrandbits(64) for _ in range(k)]
            old = held[w][:k]
            held[w] = held[w][len(old):] + new
            batch = [BlockStored(block_hashes=new)]
            if old:
                batch.append(BlockRemoved(block_hashes=old))
            await idx.apply(w, batch)
            return len(new) + len(old)

        i = 0
        while time.perf_counter() < stop:
            group = [workers[(i + j) % len(workers)] for j in range(args["writer_concurrency"])]
            i += len(group)
            events += sum(await asyncio.gather(*[one(w) for w in group]))
            if rate > 0:
                ahead = events / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        elapsed = time.perf_counter() - start
        if kind != "baseline":
            await idx.aclose()
        await client.aclose()
        return {"events": events, "elapsed": elapsed}

    out.put(asyncio.run(main()))


def _follower_proc(url: str, args: dict, bits: int, seconds: float, ready: Any, out: Any) -> None:
    """One gateway's replica following the change logs while the writers saturate the index:
    the CPU it spends per change applied, its lag."""

    async def main() -> dict[str, Any]:
        client = _client("cluster", url, max_connections=64)
        idx = _make_index("cluster", client, args, bits)
        rep = IndexReplica(idx, IndexReplicaConfig(lag_samples=1_000_000))
        await rep.start()
        ready.set()  # the writers start (a multiprocessing event: no wait on it here)
        c0, n0 = time.process_time(), rep.stats.changes
        rep.lag_ms.clear()
        await asyncio.sleep(seconds + 1.0)
        cpu = time.process_time() - c0
        changes = rep.stats.changes - n0
        lags = list(rep.lag_ms)
        await rep.stop()
        await idx.aclose()
        await client.aclose()
        return {"changes": changes, "cpu_s": cpu, "lag": lags}

    out.put(asyncio.run(main()))


def _heartbeats(directory: Any, rng: random.Random, every_s: float) -> Any:
    """Registry changes as a gateway's registry feed hands them to its directory: every
    `every_s`, the workers whose heartbeat (once a second) is due publish a new load (new
    infos for those, the others kept as the same objects) and the directory takes the
    snapshot."""

    async def loop() -> None:
        i = 0
        while True:
            await asyncio.sleep(every_s)
            ws = list(directory.workers)
            due = max(1, round(len(ws) * every_s))
            for _ in range(due):
                k = i % len(ws)
                i += 1
                w = ws[k]
                ws[k] = w.model_copy(update={"load": w.load.model_copy(update={
                    "num_running_reqs": rng.randrange(8), "decoding_reqs": rng.randrange(8),
                    "updated_at": time.time()})})
            directory.take(ws)

    return loop()


def _router_proc(mode: str, url: str, args: dict, seed: int, seconds: float, bits: int,
                 ready: Any, go: Any, out: Any) -> None:
    """A gateway: decide routes for `seconds`, one at a time (see the module doc)."""

    async def main() -> dict[str, Any]:
        kind = "baseline" if mode == "baseline" else "cluster"
        client = _client(kind, url, max_connections=16)
        ns = argparse.Namespace(**args)
        docs = _hot_docs(ns)
        workers = _workers(ns.workers)
        infos = _infos(workers, seed)
        rng = random.Random(seed)
        cold_rng = random.Random(seed + 1)

        def prompt() -> list[int]:
            """A hot document, or (--cold-fraction) tokens no engine and no router saw."""
            if cold_rng.random() < ns.cold_fraction:
                return [cold_rng.randrange(150_000) for _ in range(ns.prompt_blocks * BLOCK_SIZE)]
            return docs[rng.randrange(len(docs))]
        rep: IndexReplica | None = None
        warm: dict[str, Any] = {}
        background: list[asyncio.Task[None]] = []
        if mode == "baseline":
            idx: Any = _make_index(kind, client, args, bits)
            decide = _legacy_decider(idx, workers, infos)
        else:
            if mode == "replica":
                rss0 = _rss()
                idx = ReplicatedPrefixIndex(client, NS, bucket_bits=bits,
                                            partitions=args["partitions"], liveness_cache_s=1.0,
                                            replica=IndexReplicaConfig(lag_samples=1_000_000))
                await idx.start()
                rep = idx.replica
                pairs = rep.pairs
                warm = {"warm_s": round(rep.stats.warm_s, 2), "pairs": pairs,
                        "bytes_per_pair": round((_rss() - rss0) / max(pairs, 1), 1)}
            else:
                idx = _make_index(kind, client, args, bits)
            directory = WorkerDirectory(client, NS, "bench", ClusterSecret.generate())
            directory.take(list(infos.values()))
            stage = RouteStage(directory, KVPolicy(), idx, GatewayMetrics(),
                               hash_cache_blocks=ns.hash_cache)
            decide = _gateway_decider(stage, directory)
            background.append(asyncio.create_task(_heartbeats(directory, random.Random(seed + 2),
                                                              FEED_VIEW_S)))

        for _ in range(50):  # warm up: scripts loaded, slots and epoch map cached
            await decide(prompt())
        ready.set()
        while not go.is_set():  # the replica keeps following meanwhile
            await asyncio.sleep(0.05)
        if rep is not None:
            while not rep.synced():
                await asyncio.sleep(0.005)
            rep.lag_ms.clear()
        lat: list[float] = []
        lookups: list[float] = []
        hits = unsynced = 0
        decide_cpu = gen_cpu = 0.0
        cpu0 = time.process_time()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            if rep is not None:
                unsynced += not rep.synced()
            c = time.process_time()
            tokens = prompt()  # the workload's (a cold prompt: 1,024 random tokens), not counted
            c1 = time.process_time()
            gen_cpu += c1 - c
            t, tl, hit = await decide(tokens)
            decide_cpu += time.process_time() - c1
            lat.append(t)
            lookups.append(tl)
            hits += hit
            await asyncio.sleep(0)  # the replica's follower, the registry changes run meanwhile
        cpu = time.process_time() - cpu0 - gen_cpu
        res = {"decisions": len(lat), "cpu_s": cpu, "decide_cpu_s": decide_cpu, "lat": lat,
               "lookup": lookups, "hits": hits, "unsynced": unsynced, **warm}
        for task in background:
            task.cancel()
        if rep is not None:
            res["lag"] = list(rep.lag_ms)
            res["synced"] = rep.synced()
            res["replica_stats"] = vars(rep.stats)
        if kind != "baseline":
            await idx.aclose()
        await client.aclose()
        return res

    out.put(asyncio.run(main()))


#: requests a gateway has in flight in the routing phase: each gets its first token this many
#: decisions after its dispatch, and ends after `_IN_FLIGHT`
_IN_FLIGHT, _FIRST_TOKEN_AFTER = 256, 16


def _gateway_decider(stage: RouteStage, directory: WorkerDirectory) -> Any:
    """A decision as the gateway makes it: RouteStage.route (hash, lookup in the replica or
    Redis, the dispatch ledger's pending prefixes, shortlist, kv policy) and the dispatch
    noted (RouteStage.sent, the decode worker's in-flight count); the requests dispatched
    earlier get their first token and end meanwhile (ledger and counts, not timed)."""
    lookup_s = [0.0]
    cached_blocks = stage._cached_blocks

    async def timed_lookup(*a: Any) -> Any:  # hash + lookup + pending prefixes
        t = time.perf_counter()
        try:
            return await cached_blocks(*a)
        finally:
            lookup_s[0] = time.perf_counter() - t

    stage._cached_blocks = timed_lookup  # type: ignore[method-assign]
    flying: list[tuple[str, str]] = []
    n = [0]

    async def decide(tokens: list[int]) -> tuple[float, float, bool]:
        t0 = time.perf_counter()
        lookup_s[0] = 0.0
        d = await stage.route(tokens)
        n[0] += 1
        rid = f"r{n[0]}"
        stage.sent(d, rid, len(tokens))
        w = d.decode.worker_id
        directory.in_flight[w] += 1
        elapsed = time.perf_counter() - t0
        flying.append((rid, w))
        if len(flying) > _FIRST_TOKEN_AFTER:
            early = flying[-_FIRST_TOKEN_AFTER - 1]
            stage.ledger.first_token(early[0], early[1])
        if len(flying) > _IN_FLIGHT:
            done, dw = flying.pop(0)
            stage.ledger.finished(done)
            directory.in_flight[dw] -= 1
            if directory.in_flight[dw] <= 0:
                del directory.in_flight[dw]
        return elapsed, lookup_s[0], d.predicted_cached_blocks > 0

    return decide


def _legacy_decider(idx: Any, workers: list[str], infos: dict[str, WorkerInfo]) -> Any:
    """Today's gateway before issue 18, as the baseline: every block hashed, the Lua lookup
    of every worker, the policy scoring all of them; the dispatch noted."""
    in_flight: dict[str, int] = {}
    policy = KVPolicy()
    hasher = BlockHasher(BLOCK_SIZE, "sha256", hash_seed="0")
    cands = list(infos.values())
    dispatched: list[str] = []

    async def decide(tokens: list[int]) -> tuple[float, float, bool]:
        t0 = time.perf_counter()
        hashes = hasher.block_hashes(tokens)
        t1 = time.perf_counter()
        cached = await idx.longest_prefixes(hashes, workers)
        t2 = time.perf_counter()
        d = policy.choose([], cands, RouteRequest(num_tokens=len(tokens), cached_blocks=cached,
                                                  in_flight=in_flight))
        w = d.decode.worker_id
        in_flight[w] = in_flight.get(w, 0) + 1  # the dispatch; the oldest one completes
        dispatched.append(w)
        if len(dispatched) > _IN_FLIGHT:
            done = dispatched.pop(0)
            in_flight[done] -= 1
        return time.perf_counter() - t0, t2 - t1, d.predicted_cached_blocks > 0

    return decide


def _collect(q: Any, procs: list[Any], n: int) -> list[dict]:
    """`n` results from `q`; raises once a process exited without leaving its result."""
    out: list[dict] = []
    while len(out) < n:
        try:
            out.append(q.get(timeout=2.0))
        except Exception:
            if sum(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                raise RuntimeError("a benchmark process failed (see its traceback above)")
    return out


# -- phases --------------------------------------------------------------------------------------

def _idle_rates(ports: list[int], seconds: float = 2.0) -> dict[int, float]:
    """CPU-seconds per second each primary spends with no client traffic."""
    s0 = _primary_stats(ports)
    time.sleep(seconds)
    s1 = _primary_stats(ports)
    return {p: (s1[p]["cpu"] - s0[p]["cpu"]) / seconds for p in s1 if p in s0}


def _writes(kind: str, url: str, ports: list[int], args: argparse.Namespace, bits: int,
            shards: int) -> dict[str, Any]:
    """Saturated writes; on the cluster with one replica following."""
    idle_rate = _idle_rates(ports)
    ctx = mp.get_context("spawn")
    aargs = _plain(args)
    workers = _workers(args.workers)
    n = args.writer_procs
    q = ctx.Queue()
    go = ctx.Event()
    follower = None
    if kind == "cluster":
        follower = ctx.Process(target=_follower_proc, args=(url, aargs, bits, args.seconds, go, q))
        follower.start()
    else:
        go.set()
    writers = [ctx.Process(target=_writer_proc, args=(kind, url, aargs, 100 + i, args.seconds,
                                                      0.0, workers[i::n], bits, go, q))
               for i in range(n)]
    for p in writers:
        p.start()
    while not go.wait(1.0):
        if follower is not None and follower.exitcode is not None:
            raise RuntimeError("the replica follower failed (see its traceback above)")
    s0 = _primary_stats(ports)
    t0 = time.perf_counter()
    res = _collect(q, [*writers, *([follower] if follower else [])], n + (follower is not None))
    s1 = _primary_stats(ports)
    busy = time.perf_counter() - t0
    for p in [*writers, *([follower] if follower else [])]:
        p.join()
    wres = [r for r in res if "events" in r]
    events = sum(r["events"] for r in wres)
    elapsed = max(r["elapsed"] for r in wres)
    shard_cpu = [s1[p]["cpu"] - s0[p]["cpu"] for p in s1 if p in s0]
    # less what the shards spend idle (cluster bus, cron) over as long
    idle = [idle_rate.get(p, 0.0) * busy for p in s1 if p in s0]
    work = [max(c - i, 1e-9) for c, i in zip(shard_cpu, idle)]
    out: dict[str, Any] = {
        "events_per_s": round(events / elapsed),
        "events_per_s_per_shard": round(events / elapsed / shards),
        "shard_cpu_s": [round(c, 2) for c in shard_cpu],
        "shard_idle_cpu_s": [round(i, 3) for i in idle],
        # what one shard core absorbs: events it received per CPU-second it spent on them
        "events_per_shard_cpu_s": round(events / shards / statistics.mean(work)),
        "events_per_shard_cpu_s_raw": round(events / shards / max(statistics.mean(shard_cpu),
                                                                   1e-9)),
    }
    fres = [r for r in res if "changes" in r]
    if fres:
        f = fres[0]
        out["replica_follow"] = {
            "changes_applied": f["changes"],
            "changes_per_cpu_s": round(f["changes"] / max(f["cpu_s"], 1e-9)),
            "lag_p50_ms": _pct(f["lag"], 0.5, 1), "lag_p99_ms": _pct(f["lag"], 0.99, 1),
        }
    return out


def _follow_only(url: str, args: argparse.Namespace, bits: int) -> dict[str, Any]:
    """One replica following while one writer publishes at `--background-rate` and nothing
    else runs: the lag the protocol itself gives, apart from the CPU contention of the
    saturated phases on this machine."""
    ctx = mp.get_context("spawn")
    aargs = _plain(args)
    q = ctx.Queue()
    go = ctx.Event()
    follower = ctx.Process(target=_follower_proc, args=(url, aargs, bits, args.seconds, go, q))
    follower.start()
    while not go.wait(1.0):
        if follower.exitcode is not None:
            raise RuntimeError("the replica follower failed (see its traceback above)")
    bg = ctx.Process(target=_writer_proc, args=("cluster", url, aargs, 998, args.seconds + 1,
                                                args.background_rate, _workers(args.workers),
                                                bits, None, q))
    bg.start()
    res = _collect(q, [follower, bg], 2)
    for p in (follower, bg):
        p.join()
    f = next(r for r in res if "changes" in r)
    w = next(r for r in res if "events" in r)
    return {"events_per_s": round(w["events"] / w["elapsed"]), "changes_applied": f["changes"],
            "changes_per_cpu_s": round(f["changes"] / max(f["cpu_s"], 1e-9)),
            "lag_p50_ms": _pct(f["lag"], 0.5, 1), "lag_p99_ms": _pct(f["lag"], 0.99, 1)}


def _routing(mode: str, url: str, ports: list[int], args: argparse.Namespace, bits: int
             ) -> dict[str, Any]:
    """Gateways routing while one writer publishes at `--background-rate`."""
    kind = "baseline" if mode == "baseline" else "cluster"
    ctx = mp.get_context("spawn")
    aargs = _plain(args)
    q = ctx.Queue()
    go = ctx.Event()
    readies = [ctx.Event() for _ in range(args.router_procs)]
    routers = [ctx.Process(target=_router_proc, args=(mode, url, aargs, 200 + i, args.seconds,
                                                      bits, readies[i], go, q))
               for i in range(args.router_procs)]
    for p in routers:
        p.start()
    for r in readies:
        while not r.wait(1.0):
            if any(p.exitcode is not None for p in routers):
                raise RuntimeError("a router process failed (see its traceback above)")
    bg = ctx.Process(target=_writer_proc, args=(kind, url, aargs, 999, args.seconds + 4,
                                                args.background_rate, _workers(args.workers),
                                                bits, None, q))
    bg.start()
    time.sleep(1.0)  # the background writer runs
    s0 = _primary_stats(ports)
    go.set()
    res = _collect(q, [*routers, bg], args.router_procs + 1)
    s1 = _primary_stats(ports)
    for p in [*routers, bg]:
        p.join()
    bgres = next(r for r in res if "events" in r)
    res = [r for r in res if "decisions" in r]
    lat = [x for r in res for x in r["lat"]]
    look = [x for r in res for x in r["lookup"]]
    decisions = sum(r["decisions"] for r in res)
    cpu = sum(r["cpu_s"] for r in res)
    shard_cpu = [s1[p]["cpu"] - s0[p]["cpu"] for p in s1 if p in s0]
    out: dict[str, Any] = {
        "decisions": decisions,
        "decisions_per_gateway_cpu_s": round(decisions / cpu),
        # the decisions' own CPU (hash + lookup + score), without what the process spends
        # between them (the replica following the logs, the event loop)
        "decisions_per_decision_cpu_s": round(decisions / sum(r["decide_cpu_s"] for r in res)),
        "decision_p50_ms": _pct(lat, 0.5), "decision_p99_ms": _pct(lat, 0.99),
        "lookup_p50_ms": _pct(look, 0.5), "lookup_p99_ms": _pct(look, 0.99),
        "hit_rate": round(sum(r["hits"] for r in res) / max(decisions, 1), 3),
        "redis_cpu_ms_per_decision": round(sum(shard_cpu) / max(decisions, 1) * 1e3, 4),
        "background_events_per_s": round(bgres["events"] / bgres["elapsed"]),
    }
    if mode == "replica":
        lags = [x for r in res for x in r["lag"]]
        out["replica"] = {
            "lag_p50_ms": _pct(lags, 0.5, 1), "lag_p99_ms": _pct(lags, 0.99, 1),
            "lag_samples": len(lags), "synced_at_end": all(r["synced"] for r in res),
            # decisions made while the replica was not synced (they under-report)
            "unsynced_decisions": sum(r["unsynced"] for r in res),
            "warm_s": max(r["warm_s"] for r in res), "pairs": res[0]["pairs"],
            "bytes_per_pair": statistics.mean(r["bytes_per_pair"] for r in res),
            "stats": [r["replica_stats"] for r in res],
        }
    return out


def _plain(args: argparse.Namespace) -> dict[str, Any]:
    d = vars(args).copy()
    d.pop("json", None)
    return d


def _measure(kind: str, url: str, ports: list[int], args: argparse.Namespace, blocks: int,
             modes: list[str]) -> dict[str, Any]:
    bits = _bucket_bits(blocks + args.hot_docs * args.prompt_blocks * 3)
    before = _primary_stats(ports)
    pop = asyncio.run(_populate(kind, url, args, blocks, bits))
    after = _primary_stats(ports)
    mem = sum(after[p]["mem"] - before.get(p, {"mem": 0})["mem"] for p in after)
    shards = len(after)
    result: dict[str, Any] = {"shards": shards, "bucket_bits": bits if kind != "baseline" else None,
                              "partitions": args.partitions if kind != "baseline" else None,
                              **pop, "bytes_per_pair": round(mem / pop["pairs"], 1)}
    print(f"{kind}: populated {pop['pairs']:,} pairs in {pop['populate_s']} s",
          file=sys.stderr, flush=True)
    result["writes"] = _writes(kind, url, ports, args, bits, shards)
    print(f"{kind}: writes {result['writes']}", file=sys.stderr, flush=True)
    if kind != "baseline":
        result["log_bytes_after_writes"] = _log_bytes(url, args, bits)
        result["replica_follow_background_rate"] = _follow_only(url, args, bits)
        print(f"{kind}: following alone {result['replica_follow_background_rate']}",
              file=sys.stderr, flush=True)
    for mode in modes:
        result[f"routing_{mode}"] = _routing(mode, url, ports, args, bits)
        print(f"{kind}: routing {mode} {result[f'routing_{mode}']}", file=sys.stderr, flush=True)
    return result


def _log_bytes(url: str, args: argparse.Namespace, bits: int) -> int:
    async def main() -> int:
        client = _client("cluster", url)
        idx = _make_index("cluster", client, args, bits)
        keys = [idx.layout.log_key(p) for p in range(idx.layout.partitions)]
        sizes = await idx.nodes.run([("MEMORY", "USAGE", k) for k in keys])
        await idx.aclose()
        await client.aclose()
        return sum(int(s or 0) for s in sizes)
    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000, help="simulated workers (engines)")
    ap.add_argument("--blocks", type=int, default=2_000_000, help="indexed blocks (new layout)")
    ap.add_argument("--baseline-blocks", type=int, default=300_000,
                    help="indexed blocks of the baseline (it needs ~190-280 B per pair)")
    ap.add_argument("--prompt-blocks", type=int, default=64)
    ap.add_argument("--hot-docs", type=int, default=1000, help="prompts the routers look up")
    ap.add_argument("--shared-blocks", type=int, default=4,
                    help="blocks of the system prompt 30%% of prompts start with")
    ap.add_argument("--shared-holders", type=int, default=50,
                    help="workers holding that system prompt")
    ap.add_argument("--primaries", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=None,
                    help="index partitions (default: --primaries, one per primary; a multiple "
                         "of --primaries spreads them evenly)")
    ap.add_argument("--writer-procs", type=int, default=2)
    ap.add_argument("--writer-concurrency", type=int, default=16,
                    help="engine steps in flight per writer process")
    ap.add_argument("--step-stored", type=int, default=16, help="blocks stored per engine step")
    ap.add_argument("--router-procs", type=int, default=2, help="gateway processes routing")
    ap.add_argument("--cold-fraction", type=float, default=0.1,
                    help="share of routed prompts never seen before (fresh tokens)")
    ap.add_argument("--hash-cache", type=int, default=100_000,
                    help="block digests a gateway remembers (new paths; 0: none)")
    ap.add_argument("--background-rate", type=float, default=20_000,
                    help="block events/s published while routing")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps-per-s", type=float, default=20.0,
                    help="engine steps per second of a GPU engine (for the fleet figures)")
    ap.add_argument("--no-redis-routing", action="store_true",
                    help="skip routing by Redis lookups on the cluster (the replica's is kept)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/index_scale.json"))
    args = ap.parse_args()
    if args.partitions is None:
        args.partitions = args.primaries
    for name in ("workers", "blocks", "prompt_blocks", "hot_docs", "primaries", "writer_procs",
                 "router_procs", "step_stored", "writer_concurrency", "partitions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if not 0 <= args.cold_fraction <= 1:
        ap.error("--cold-fraction must be in [0, 1]")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    from services.controller.redis_server import RedisServer

    started = time.time()
    with contextlib.ExitStack() as stack:
        # a node unanswered for 2 s (the tests' setting) is common on this busy machine:
        # failovers would interrupt the measurements
        cluster = stack.enter_context(redis_cluster(args.primaries, args.replicas,
                                                    extra=["--cluster-node-timeout", "30000"]))
        single_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="splitserve-bench-")))
        single = RedisServer(single_dir)
        single.start()
        stack.callback(single.stop)
        print(f"cluster {args.primaries}x{1 + args.replicas} on {cluster.ports}, single on "
              f"{single.port}", file=sys.stderr, flush=True)
        modes = ["replica"] if args.no_redis_routing else ["redis", "replica"]
        runs = {
            "cluster": _measure("cluster", cluster.url, cluster.ports, args, args.blocks, modes),
            "baseline": _measure("baseline", single.url, [single.port], args,
                                 min(args.blocks, args.baseline_blocks), ["baseline"]),
        }
    new, old = runs["cluster"], runs["baseline"]
    rep, base = new["routing_replica"], old["routing_baseline"]
    ratios = {
        "decisions_per_gateway_cpu_s": round(rep["decisions_per_gateway_cpu_s"]
                                             / base["decisions_per_gateway_cpu_s"], 2),
        "decision_p99_ms": round(rep["decision_p99_ms"] / base["decision_p99_ms"], 3),
        "lookup_p99_ms": round(rep["lookup_p99_ms"] / base["lookup_p99_ms"], 3),
        "events_per_shard_cpu_s": round(new["writes"]["events_per_shard_cpu_s"]
                                        / old["writes"]["events_per_shard_cpu_s"], 3),
        "bytes_per_pair": round(new["bytes_per_pair"] / old["bytes_per_pair"], 3),
    }
    # a 1,000-engine GPU fleet: stored + removed blocks per step, `--steps-per-s` steps/s
    fleet_rate = round(1000 * args.step_stored * 2 * args.steps_per_s)
    follow = new["writes"].get("replica_follow", {})
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "wall_s": round(time.time() - started, 1), "runs": runs,
           "ratios": {"new/baseline": ratios},
           "derived": {
               "gpu_fleet_events_per_s": fleet_rate,
               "shards_for_gpu_fleet": -(-fleet_rate // max(new["writes"]["events_per_shard_cpu_s"], 1)),
               "bytes_for_100M_pairs_GiB": round(new["bytes_per_pair"] * 100e6 / 2**30, 2),
               "replica_lag_p99_ms": rep["replica"]["lag_p99_ms"],
               "replica_lag_p99_ms_saturated_writes": follow.get("lag_p99_ms"),
               "replica_lag_p99_ms_following_alone": new["replica_follow_background_rate"][
                   "lag_p99_ms"],
               "gateway_cores_to_follow_gpu_fleet": round(
                   fleet_rate / follow["changes_per_cpu_s"], 3) if follow else None,
           }}
    print(f"{'':18} {'dec/cpu-s':>10} {'dec p50':>8} {'dec p99':>8} {'look p50':>9} "
          f"{'look p99':>9} {'lag p99':>8}")
    for name, f in runs.items():
        for key in [k for k in f if k.startswith("routing_")]:
            rt = f[key]
            lag = rt.get("replica", {}).get("lag_p99_ms")
            lag = "" if lag is None else lag  # no sample: the replica applied no change
            print(f"{name + '/' + key[8:]:18} {rt['decisions_per_gateway_cpu_s']:>10} "
                  f"{rt['decision_p50_ms']:>8} {rt['decision_p99_ms']:>8} {rt['lookup_p50_ms']:>9} "
                  f"{rt['lookup_p99_ms']:>9} {lag:>8}")
    print(f"{'':10} {'ev/s/shard':>11} {'ev/shard-cpu-s':>15} {'B/pair':>7} {'pairs':>12}")
    for name, f in runs.items():
        wr = f["writes"]
        print(f"{name:10} {wr['events_per_s_per_shard']:>11} {wr['events_per_shard_cpu_s']:>15} "
              f"{f['bytes_per_pair']:>7} {f['pairs']:>12,}")
    print("new/baseline", json.dumps(ratios))
    print("derived", json.dumps(out["derived"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json_text.dumps(out))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
