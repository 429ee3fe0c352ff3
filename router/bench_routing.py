"""Micro-benchmark of routing decisions (`python -m router.bench_routing`; not a test).

A decision is what the gateway does per request: hash the prompt's tokens into block hashes
(vLLM's algorithm), look up every live worker's longest cached prefix in Redis, and score the
workers with the kv policy. The index holds `--blocks` distinct blocks over `--workers` live
workers (documents of `--prompt-blocks` chained blocks, each held by 1-4 workers up to a random
depth); 10% of prompts are cold.

Two implementations run in the same invocation, on the same Redis and workload:
- `lua`:   the production path, one EVALSHA per decision (router/prefix_index.py);
- `naive`: the baseline, one pipelined ZRANGEBYLEX per block and the prefix matched in Python.

Each is timed with one decision in flight (latency p50/p99) and with `--concurrency` in flight
(throughput of one router process = one core). Prints a table and writes JSON (`--json`) with the
figures and the lua/naive ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.policies import KVPolicy, RouteRequest
from router.prefix_index import PrefixIndex
from router.redis_client import RedisClientConfig, redis_client
from router.registry import WorkerInfo, WorkerRole

NS = "bench"
Lookup = Callable[[Sequence[int]], Awaitable[dict[str, int]]]


def _naive_lookup(r: aioredis.Redis, idx: PrefixIndex, workers: list[str]) -> Lookup:
    """Baseline: fetch each block's members (pipelined), match the prefix client-side."""

    async def lookup(hashes: Sequence[int]) -> dict[str, int]:
        async with r.pipeline(transaction=False) as pipe:
            pipe.hgetall(idx.ids_key)
            for w in workers:
                pipe.exists(idx.alive_key(w))
            for h in hashes:
                pipe.zrangebylex(idx.block_key(h), f"({h:016x}", f"({h:016x}:")
            res = await pipe.execute()
        epochs = {v.decode(): k.decode() for k, v in res[0].items()}
        live = {w for w, alive in zip(workers, res[1: 1 + len(workers)]) if alive}
        depth = {w: 0 for w in live}
        candidates = set(live)
        for i, members in enumerate(res[1 + len(workers):]):
            names = {epochs.get(m.decode()[16:]) for m in members}
            candidates &= names
            if not candidates:
                break
            for w in candidates:
                depth[w] = i + 1
        return depth

    return lookup


async def _populate(idx: PrefixIndex, r: aioredis.Redis, hasher: BlockHasher,
                    args: argparse.Namespace, rng: random.Random) -> list[list[int]]:
    workers = [f"worker-{i}" for i in range(args.workers)]
    for w in workers:
        await r.sadd(f"{NS}:workers", w)
        await r.set(f"{NS}:worker:{w}:alive", "1")
    n_docs = max(args.blocks // args.prompt_blocks, 1)
    tokens_per_doc = args.prompt_blocks * args.block_size
    docs = [[rng.randrange(0, 150_000) for _ in range(tokens_per_doc)] for _ in range(n_docs)]
    per_worker: dict[str, list[int]] = {w: [] for w in workers}
    for doc in docs:
        hashes = hasher.block_hashes(doc)
        for w in rng.sample(workers, rng.randint(1, 4)):
            per_worker[w].extend(hashes[: rng.randint(1, len(hashes))])
    for w, hashes in per_worker.items():
        await idx.add_blocks(w, hashes)
    return docs


_COLD: list[list[int]] = []


def _prompt(docs: list[list[int]], rng: random.Random, n_tokens: int) -> list[int]:
    """A prompt: 90% an indexed document, 10% cold (never indexed). Cold prompts are made up
    front so that generating them is not timed as part of a decision."""
    if not _COLD:
        cold_rng = random.Random(99)
        _COLD.extend([cold_rng.randrange(0, 150_000) for _ in range(n_tokens)]
                     for _ in range(256))
    if rng.random() < 0.1:
        return _COLD[rng.randrange(len(_COLD))]
    return docs[rng.randrange(len(docs))]


async def _measure(decide: Callable[[list[int]], Awaitable[None]], docs: list[list[int]],
                   args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(1)
    n_tokens = args.prompt_blocks * args.block_size
    latencies: list[float] = []
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        p = _prompt(docs, rng, n_tokens)
        s = time.perf_counter()
        await decide(p)
        latencies.append(time.perf_counter() - s)
    done = 0
    loaded: list[float] = []

    async def loop(stop: float, seed: int) -> None:
        nonlocal done
        lrng = random.Random(seed)
        while time.perf_counter() < stop:
            p = _prompt(docs, lrng, n_tokens)
            s = time.perf_counter()
            await decide(p)
            loaded.append(time.perf_counter() - s)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*[loop(start + args.seconds, i) for i in range(args.concurrency)])
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "serial_decisions_per_s": round(len(latencies) / sum(latencies)),
        "serial_p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "serial_p99_ms": round(latencies[min(int(len(latencies) * 0.99), len(latencies) - 1)]
                               * 1e3, 3),
        "concurrent_decisions_per_s": round(done / elapsed),
        "concurrent_p50_ms": round(statistics.median(loaded) * 1e3, 3),
        "concurrent_p99_ms": round(sorted(loaded)[min(int(len(loaded) * 0.99), len(loaded) - 1)]
                                   * 1e3, 3),
    }


async def run(url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    r = redis_client(url, RedisClientConfig(max_connections=args.concurrency + 4).for_tools())
    await r.flushdb()
    idx = PrefixIndex(r, NS)
    hasher = BlockHasher(args.block_size, "sha256", hash_seed="0")
    docs = await _populate(idx, r, hasher, args, rng)
    workers = [WorkerInfo(worker_id=f"worker-{i}", role=WorkerRole.BOTH, address="-", model="m",
                          block_size=args.block_size) for i in range(args.workers)]
    ids = [w.worker_id for w in workers]
    policy = KVPolicy()
    runs: dict[str, dict[str, float]] = {}
    for name, lookup in (("naive", _naive_lookup(r, idx, ids)),
                         ("lua", lambda h: idx.longest_prefixes(h, ids))):
        async def decide(tokens: list[int], lookup: Lookup = lookup) -> None:
            cached = await lookup(hasher.block_hashes(tokens))
            policy.choose([], workers, RouteRequest(num_tokens=len(tokens), cached_blocks=cached))

        await decide(docs[0])  # warm up (loads the script)
        runs[name] = await _measure(decide, docs, args)
    await r.aclose()
    ratios = {k: round(runs["lua"][k] / runs["naive"][k], 3) for k in runs["lua"]}
    return {"config": {k: getattr(args, k) for k in ("workers", "blocks", "prompt_blocks",
                                                     "block_size", "concurrency", "seconds")},
            "runs": runs, "ratios": {"lua/naive": ratios}}


@contextlib.contextmanager
def _private_redis():
    """A throw-away Redis for the benchmark when no --redis-url is given."""
    from services.controller.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as d:
        server = RedisServer(Path(d))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="use this Redis instead of a private one (FLUSHDB!)")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--prompt-blocks", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(_private_redis()).url
        result = asyncio.run(run(url, args))
    print(f"{'':8} {'serial/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'concurrent/s':>13} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for name, f in result["runs"].items():
        print(f"{name:8} {f['serial_decisions_per_s']:>10} {f['serial_p50_ms']:>8} "
              f"{f['serial_p99_ms']:>8} {f['concurrent_decisions_per_s']:>13} "
              f"{f['concurrent_p50_ms']:>8} {f['concurrent_p99_ms']:>8}")
    print("lua/naive", json.dumps(result["ratios"]["lua/naive"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
