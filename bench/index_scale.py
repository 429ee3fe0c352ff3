"""The prefix index at fleet scale (`python -m bench.index_scale`; not a test).

Starts a local Redis Cluster (`--primaries` x (1 + `--replicas`) redis-servers) and a single
Redis, and on each builds an index of `--workers` workers and `--blocks` indexed blocks: the
new layout (router/prefix_index.py) on the cluster, today's single-Redis Lua index
(bench/index_baseline.py) on the single Redis as the baseline (with at most
`--baseline-blocks`: it needs ~190 bytes per pair). Then, for each:

- writes: `--writer-procs` processes publish event batches for the simulated workers as fast
  as the index absorbs them (an engine step: `--step-stored` BlockStored + as many
  BlockRemoved); reported as block events/s, per shard, and per Redis CPU-second of a shard
  (INFO cpu deltas: what one shard core can absorb, independent of this machine's load);
- routing: `--router-procs` processes make decisions (hash a `--prompt-blocks`-block prompt
  with vLLM's algorithm, look up every live worker's cached prefix, pick the best: the longest
  prefix, ties to the least loaded) while one writer process keeps publishing at
  `--background-rate` block events/s; reported as decisions per routing CPU-second (a routing
  core), and lookup p50/p99;
- the new layout on the single Redis too (its one-EVALSHA lookup), unless `--no-single`;
- memory: bytes per (block, worker) pair from INFO used_memory (primaries only) before and
  after the index was built.

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

from bench.index_baseline import LegacyPrefixIndex
from bench.redis_cluster import redis_cluster
from router.block_hash import BlockHasher
from router.kv_events import BlockRemoved, BlockStored
from router.prefix_index import PrefixIndex

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


def _bucket_bits(pairs: int) -> int:
    """Buckets of ~64 members on average: listpack-encoded (zset-max-listpack-entries 128)."""
    return max(8, min(24, (max(pairs // 64, 1)).bit_length()))


def _make_index(kind: str, client: Any, bucket_bits: int) -> Any:
    if kind == "baseline":
        return LegacyPrefixIndex(client, NS)
    return PrefixIndex(client, NS, bucket_bits=bucket_bits, liveness_cache_s=1.0)


def _client(kind: str, url: str, **kw: Any) -> Any:
    if kind in ("baseline", "single"):
        return aioredis.Redis.from_url(url, **kw)
    return RedisCluster.from_url(url, **kw)


async def _populate(kind: str, url: str, args: argparse.Namespace, blocks: int,
                    bucket_bits: int) -> dict[str, Any]:
    """Register the workers, index the hot documents and `blocks` filler blocks."""
    client = _client(kind, url, max_connections=64)
    idx = _make_index(kind, client, bucket_bits)
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
    chunk = 20_000
    done = 0
    while done < filler:
        n = min(chunk, filler - done)
        w = workers[(done // chunk) % len(workers)]
        batch = [rng.getrandbits(64) for _ in range(n)]
        await add(w, batch)
        pairs += n
        done += n
        if done % 1_000_000 < chunk:
            print(f"  {kind}: {done:,}/{filler:,} filler blocks", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    if kind != "baseline":
        await idx.aclose()
    await client.aclose()
    return {"pairs": pairs, "blocks": hot_blocks + filler, "populate_s": round(elapsed, 1),
            "populate_pairs_per_s": round(pairs / elapsed)}


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


# -- processes -----------------------------------------------------------------------------------

def _writer_proc(kind: str, url: str, args: dict, seed: int, seconds: float, rate: float,
                 workers: list[str], bucket_bits: int, out: Any) -> None:
    """Publish engine steps for `workers` (round robin) for `seconds`; `rate` > 0 caps block
    events/s, 0 is as fast as the index absorbs them."""

    async def main() -> dict[str, float]:
        client = _client(kind, url, max_connections=32)
        idx = _make_index(kind, client, bucket_bits)
        rng = random.Random(seed)
        held: dict[str, list[int]] = {w: [] for w in workers}
        events = 0
        k = args["step_stored"]
        if kind == "cluster":
            for w in workers:  # epochs read once, one at a time (not timed)
                await idx.epoch(w)
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


def _router_proc(kind: str, url: str, args: dict, seed: int, seconds: float,
                 bucket_bits: int, out: Any) -> None:
    """Decide routes for `seconds`, one at a time: hash + lookup + score."""

    async def main() -> dict[str, Any]:
        client = _client(kind, url, max_connections=8)
        idx = _make_index(kind, client, bucket_bits)
        ns = argparse.Namespace(**args)
        docs = _hot_docs(ns)
        workers = _workers(ns.workers)
        load = {w: random.Random(seed).randrange(8) for w in workers}
        hasher = BlockHasher(BLOCK_SIZE, "sha256", hash_seed="0")
        rng = random.Random(seed)
        for _ in range(50):  # warm up: scripts loaded, slots and epoch map cached
            await idx.longest_prefixes(hasher.block_hashes(docs[0]), workers)
        lat: list[float] = []
        lookups: list[float] = []
        hits = 0
        cpu0 = time.process_time()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            tokens = docs[rng.randrange(len(docs))]
            t0 = time.perf_counter()
            hashes = hasher.block_hashes(tokens)
            t1 = time.perf_counter()
            cached = await idx.longest_prefixes(hashes, workers)
            t2 = time.perf_counter()
            best = max(cached.items(), key=lambda kv: (kv[1], -load[kv[0]]), default=None)
            if best is not None and best[1] > 0:
                hits += 1
            lat.append(time.perf_counter() - t0)
            lookups.append(t2 - t1)
        cpu = time.process_time() - cpu0
        if kind != "baseline":
            await idx.aclose()
        await client.aclose()
        return {"decisions": len(lat), "cpu_s": cpu, "lat": lat, "lookup": lookups, "hits": hits}

    out.put(asyncio.run(main()))


def _run_procs(target: Any, argsets: list[tuple]) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, q)) for a in argsets]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(int(len(xs) * q), len(xs) - 1)] * 1e3, 3) if xs else 0.0


def _measure(kind: str, url: str, ports: list[int], args: argparse.Namespace, blocks: int
             ) -> dict[str, Any]:
    bits = _bucket_bits(blocks + args.hot_docs * args.prompt_blocks * 3)
    before = _primary_stats(ports)
    pop = asyncio.run(_populate(kind, url, args, blocks, bits))
    after = _primary_stats(ports)
    mem = sum(after[p]["mem"] - before.get(p, {"mem": 0})["mem"] for p in after)
    shards = len(after)
    result: dict[str, Any] = {"shards": shards, "bucket_bits": bits if kind != "baseline" else None,
                              **pop, "bytes_per_pair": round(mem / pop["pairs"], 1)}
    workers = _workers(args.workers)
    aargs = vars(args).copy()
    aargs.pop("json", None)
    # writes, saturated
    n = args.writer_procs
    s0 = _primary_stats(ports)
    res = _run_procs(_writer_proc, [(kind, url, aargs, 100 + i, args.seconds, 0.0,
                                     workers[i::n], bits) for i in range(n)])
    s1 = _primary_stats(ports)
    events = sum(r["events"] for r in res)
    elapsed = max(r["elapsed"] for r in res)
    shard_cpu = [s1[p]["cpu"] - s0[p]["cpu"] for p in s1 if p in s0]
    result["writes"] = {
        "events_per_s": round(events / elapsed),
        "events_per_s_per_shard": round(events / elapsed / shards),
        "shard_cpu_s": [round(c, 2) for c in shard_cpu],
        # what one shard core absorbs: events it received per CPU-second it spent
        "events_per_shard_cpu_s": round(events / shards / max(statistics.mean(shard_cpu), 1e-9)),
    }
    # routing, with a background writer at a GPU-like rate
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    bg = ctx.Process(target=_writer_proc, args=(kind, url, aargs, 999, args.seconds + 8,
                                                args.background_rate, workers, bits, q))
    bg.start()
    s0 = _primary_stats(ports)
    res = _run_procs(_router_proc, [(kind, url, aargs, 200 + i, args.seconds, bits)
                                    for i in range(args.router_procs)])
    s1 = _primary_stats(ports)
    bgres = q.get()
    bg.join()
    lat = [x for r in res for x in r["lat"]]
    look = [x for r in res for x in r["lookup"]]
    decisions = sum(r["decisions"] for r in res)
    cpu = sum(r["cpu_s"] for r in res)
    shard_cpu = [s1[p]["cpu"] - s0[p]["cpu"] for p in s1 if p in s0]
    result["routing"] = {
        "decisions": decisions,
        "decisions_per_routing_cpu_s": round(decisions / cpu),
        "decision_p50_ms": _pct(lat, 0.5), "decision_p99_ms": _pct(lat, 0.99),
        "lookup_p50_ms": _pct(look, 0.5), "lookup_p99_ms": _pct(look, 0.99),
        "hit_rate": round(sum(r["hits"] for r in res) / max(decisions, 1), 3),
        "redis_cpu_ms_per_lookup": round(sum(shard_cpu) / max(decisions, 1) * 1e3, 3),
        "background_events_per_s": round(bgres["events"] / bgres["elapsed"]),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000, help="simulated workers (engines)")
    ap.add_argument("--blocks", type=int, default=2_000_000, help="indexed blocks (new layout)")
    ap.add_argument("--baseline-blocks", type=int, default=300_000,
                    help="indexed blocks of the baseline (it needs ~190 B per pair)")
    ap.add_argument("--prompt-blocks", type=int, default=64)
    ap.add_argument("--hot-docs", type=int, default=1000, help="prompts the routers look up")
    ap.add_argument("--shared-blocks", type=int, default=4,
                    help="blocks of the system prompt 30%% of prompts start with")
    ap.add_argument("--shared-holders", type=int, default=50,
                    help="workers holding that system prompt")
    ap.add_argument("--primaries", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--writer-procs", type=int, default=2)
    ap.add_argument("--writer-concurrency", type=int, default=16,
                    help="engine steps in flight per writer process")
    ap.add_argument("--step-stored", type=int, default=16, help="blocks stored per engine step")
    ap.add_argument("--router-procs", type=int, default=2)
    ap.add_argument("--background-rate", type=float, default=20_000,
                    help="block events/s published while routing")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--no-single", action="store_true",
                    help="skip the new layout on the single Redis (its Lua lookup path)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/index_scale.json"))
    args = ap.parse_args()
    for name in ("workers", "blocks", "prompt_blocks", "hot_docs", "primaries", "writer_procs",
                 "router_procs", "step_stored", "writer_concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    from services.controller.redis_server import RedisServer

    started = time.time()
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(redis_cluster(args.primaries, args.replicas))
        single_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="splitserve-bench-")))
        single = RedisServer(single_dir)
        single.start()
        stack.callback(single.stop)
        print(f"cluster {args.primaries}x{1 + args.replicas} on {cluster.ports}, single on "
              f"{single.port}", file=sys.stderr, flush=True)
        runs = {
            "cluster": _measure("cluster", cluster.url, cluster.ports, args, args.blocks),
            "baseline": _measure("baseline", single.url, [single.port], args,
                                 min(args.blocks, args.baseline_blocks)),
        }
        if not args.no_single:
            redis.Redis(port=single.port).flushall()
            runs["single"] = _measure("single", single.url, [single.port], args,
                                      min(args.blocks, args.baseline_blocks))
    new, old = runs["cluster"], runs["baseline"]
    ratios = {
        "decisions_per_routing_cpu_s": round(new["routing"]["decisions_per_routing_cpu_s"]
                                             / old["routing"]["decisions_per_routing_cpu_s"], 3),
        "lookup_p99_ms": round(new["routing"]["lookup_p99_ms"] / old["routing"]["lookup_p99_ms"], 3),
        "events_per_shard_cpu_s": round(new["writes"]["events_per_shard_cpu_s"]
                                        / old["writes"]["events_per_shard_cpu_s"], 3),
        "bytes_per_pair": round(new["bytes_per_pair"] / old["bytes_per_pair"], 3),
    }
    # shards 1,000 GPU engines need for writes, from what one shard core absorbed
    engines_rate = 1000 * args.step_stored * 2 * 20  # 20 steps/s, stored + removed per step
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "wall_s": round(time.time() - started, 1), "runs": runs, "ratios": {"new/baseline": ratios},
           "derived": {
               "gpu_fleet_events_per_s": engines_rate,
               "shards_for_gpu_fleet": -(-engines_rate // max(new["writes"]["events_per_shard_cpu_s"], 1)),
               "bytes_for_100M_pairs_GiB": round(new["bytes_per_pair"] * 100e6 / 2**30, 2),
               "consistency_lag_p99_ms": None,  # no gateway-local replica yet
           }}
    print(f"{'':10} {'dec/cpu-s':>10} {'dec p50':>8} {'dec p99':>8} {'look p50':>9} {'look p99':>9} "
          f"{'ev/s/shard':>11} {'ev/shard-cpu-s':>15} {'B/pair':>7} {'pairs':>11}")
    for name, f in runs.items():
        rt, wr = f["routing"], f["writes"]
        print(f"{name:10} {rt['decisions_per_routing_cpu_s']:>10} {rt['decision_p50_ms']:>8} "
              f"{rt['decision_p99_ms']:>8} {rt['lookup_p50_ms']:>9} {rt['lookup_p99_ms']:>9} "
              f"{wr['events_per_s_per_shard']:>11} {wr['events_per_shard_cpu_s']:>15} "
              f"{f['bytes_per_pair']:>7} {f['pairs']:>11,}")
    print("new/baseline", json.dumps(ratios))
    print("derived", json.dumps(out["derived"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
