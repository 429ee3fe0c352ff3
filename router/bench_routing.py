"""Micro-benchmark of the prefix index lookup and of block hashing (not a test).

Starts a private redis-server (or uses ``--redis-url``), indexes ``--blocks`` distinct blocks spread
over ``--workers`` live workers (documents of ``--prompt-blocks`` chained blocks, each held by 1-4
workers up to a random depth), then times ``PrefixIndex.longest_prefixes`` on 64-block prompts:
one request in flight (latency p50/p99) and ``--concurrency`` in flight (throughput). Also times
``BlockHasher.block_hashes`` for one prompt.

    python -m router.bench_lookup [--seconds 5] [--workers 16] [--blocks 100000]
"""

from __future__ import annotations

import contextlib

import argparse
import asyncio
import json
import random
import statistics
import time
from contextlib import ExitStack

import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.prefix_index import PrefixIndex

NS = "bench"


async def _populate(idx: PrefixIndex, r: aioredis.Redis, args: argparse.Namespace, rng: random.Random) -> list[list[int]]:
    workers = [f"worker-{i}" for i in range(args.workers)]
    for w in workers:
        await r.sadd(f"{NS}:workers", w)
        await r.set(f"{NS}:worker:{w}:alive", "1")
    n_docs = args.blocks // args.prompt_blocks
    docs = [[rng.getrandbits(64) for _ in range(args.prompt_blocks)] for _ in range(n_docs)]
    per_worker: dict[str, list[int]] = {w: [] for w in workers}
    for doc in docs:
        for w in rng.sample(workers, rng.randint(1, 4)):
            per_worker[w].extend(doc[: rng.randint(1, len(doc))])
    for w, hashes in per_worker.items():
        await idx.add_blocks(w, hashes)
    return docs


def _prompt(docs: list[list[int]], rng: random.Random, n: int) -> list[int]:
    if rng.random() < 0.1:  # a cold prompt
        return [rng.getrandbits(64) for _ in range(n)]
    return docs[rng.randrange(len(docs))]


async def _bench(url: str, args: argparse.Namespace) -> dict[str, float | int]:
    rng = random.Random(0)
    r = aioredis.Redis.from_url(url, max_connections=args.concurrency + 4)
    await r.flushdb()
    idx = PrefixIndex(r, NS)
    t0 = time.perf_counter()
    docs = await _populate(idx, r, args, rng)
    populate_s = time.perf_counter() - t0
    indexed = sum([await idx.worker_block_count(f"worker-{i}") for i in range(args.workers)])
    await idx.longest_prefixes(docs[0])  # load the script
    await r.config_resetstat()

    latencies: list[float] = []
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        p = _prompt(docs, rng, args.prompt_blocks)
        s = time.perf_counter()
        await idx.longest_prefixes(p)
        latencies.append(time.perf_counter() - s)

    done = 0

    async def loop(stop: float) -> None:
        nonlocal done
        lrng = random.Random(done)
        while time.perf_counter() < stop:
            await idx.longest_prefixes(_prompt(docs, lrng, args.prompt_blocks))
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*[loop(start + args.seconds) for _ in range(args.concurrency)])
    conc_s = time.perf_counter() - start
    server_us = (await r.info("commandstats")).get("cmdstat_evalsha", {}).get("usec_per_call", 0.0)
    await r.aclose()

    hasher = BlockHasher(args.block_size, "sha256", hash_seed="0")
    tokens = [rng.randrange(0, 150_000) for _ in range(args.prompt_blocks * args.block_size)]
    n_hash = 0
    hs = time.perf_counter()
    while time.perf_counter() - hs < min(args.seconds, 2.0):
        hasher.block_hashes(tokens)
        n_hash += 1
    hash_s = time.perf_counter() - hs

    latencies.sort()
    return {
        "workers": args.workers,
        "distinct_blocks": len(docs) * args.prompt_blocks,
        "worker_block_entries": indexed,
        "populate_s": round(populate_s, 2),
        "prompt_blocks": args.prompt_blocks,
        "serial_lookups_per_s": round(len(latencies) / sum(latencies)),
        "serial_p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "serial_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
        "concurrency": args.concurrency,
        "concurrent_lookups_per_s": round(done / conc_s),
        "server_us_per_lookup": server_us,
        "hash_calls_per_s": round(n_hash / hash_s),
        "hash_us_per_block": round(hash_s / n_hash / args.prompt_blocks * 1e6, 2),
    }


def main() -> None:
    """Parse arguments, run the benchmark, print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of a private one (FLUSHDB!)")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--prompt-blocks", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with ExitStack() as stack:
        url = args.redis_url or stack.enter_context(_private_redis()).url
        print(json.dumps(asyncio.run(_bench(url, args)), indent=2))


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def _private_redis():
    """A throw-away Redis for the benchmark when no --redis-url is given."""
    import tempfile
    from pathlib import Path

    from services.controller.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as d:
        server = RedisServer(Path(d))
        server.start()
        try:
            yield server
        finally:
            server.stop()
