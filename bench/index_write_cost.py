"""Where a shard's CPU goes on the prefix index's writes (`python -m bench.index_write_cost`; not a test).

One process writes engine steps (`--step-stored` BlockStored + as many BlockRemoved of the
same worker, `--in-flight` steps at once, `--workers` workers round robin) through
`PrefixIndex.apply` into each of these, started one after the other, each filled first with
`--pairs` random (block, worker) pairs:

- `single`: one redis-server (no cluster, no replica): a write is one burst;
- `cluster_one_slot`: a 3-primary Redis Cluster without replicas, the index in ONE partition
  (one slot, one primary): a write is still one burst, on a cluster node;
- `cluster`: the same cluster, 3 partitions: a write is one burst per primary;
- `cluster_replicated`: 3 primaries with one replica each, 3 partitions (bench.index_scale's
  cluster): every write command is also fed to the shard's replica;
- `baseline`: the previous single-Redis Lua index (bench/index_baseline.py), one script call
  per step, on one redis-server.

Reported per setup and round: Redis CPU per block event (INFO cpu of the primaries, less their
idle rate), the writer's own CPU per event, and the commands per event (INFO commandstats).
Rounds alternate over the setups (`--rounds`); read the ratios within one invocation (this
machine is shared). Writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from router.kv_events import BlockRemoved, BlockStored
from router.prefix_index import PrefixIndex

NS = "bench"
SETUPS = ("single", "cluster_one_slot", "cluster", "cluster_replicated", "baseline")


def _node_stats(ports: list[int]) -> dict[int, tuple[bool, float, int]]:
    """port -> (is a primary, CPU seconds, commands processed)."""
    out = {}
    for p in ports:
        with contextlib.closing(redis.Redis(port=p)) as c:
            cpu = c.info("cpu")
            cs = c.info("commandstats")
            calls = sum(v["calls"] for k, v in cs.items()
                        if k.split("_", 1)[1] in ("zadd", "zrem", "xadd", "incrby", "evalsha",
                                                  "sadd", "srem"))
            out[p] = (c.info("replication")["role"] == "master",
                      cpu["used_cpu_sys"] + cpu["used_cpu_user"], calls)
    return out


class _Target:
    """One setup: its servers (kept running over the rounds), its index, its workers' state."""

    def __init__(self, name: str, url: str, ports: list[int], args: argparse.Namespace) -> None:
        self.name, self.url, self.ports, self.args = name, url, ports, args
        self.rng = random.Random(11)
        self.workers = [f"worker-{i:05d}" for i in range(args.workers)]
        self.held: dict[str, list[int]] = {w: [] for w in self.workers}
        self.next = 0

    async def open(self) -> None:
        a = self.args
        if self.name.startswith("cluster"):
            self.client: Any = RedisCluster.from_url(self.url, socket_timeout=60)
        else:
            self.client = aioredis.Redis.from_url(self.url, socket_timeout=60)
        if self.name == "baseline":
            self.idx: Any = LegacyPrefixIndex(self.client, NS)
        else:  # a namespace per setup: two share the cluster without replicas
            self.idx = PrefixIndex(self.client, f"{NS}-{self.name}", bucket_bits=a.bucket_bits,
                                   partitions=1 if self.name == "cluster_one_slot" else 3)

    async def close(self) -> None:
        if self.name != "baseline":
            await self.idx.aclose()
        await self.client.aclose()

    async def fill(self) -> None:
        a = self.args
        if self.name == "baseline":
            for i in range(0, a.pairs, 20_000):
                w = self.workers[(i // 20_000) % len(self.workers)]
                await self.idx.add_blocks(w, [self.rng.getrandbits(64)
                                              for _ in range(min(20_000, a.pairs - i))])
        else:
            from bench.index_scale import _bulk_fill  # (its imports are heavy: not at start)

            await _bulk_fill(self.idx, self.workers, a.pairs, self.rng)
            layout = self.idx.layout
            await self.idx.nodes.run([("XTRIM", layout.log_key(p), "MAXLEN", 0)
                                      for p in range(layout.partitions)])
            for w in self.workers:
                await self.idx.epoch(w)
        await self.steps(len(self.workers))  # every worker holds one step's blocks

    async def steps(self, n: int) -> int:
        """Write ``n`` engine steps, ``--in-flight`` at a time; returns the block events."""
        k, idx, rng = self.args.step_stored, self.idx, self.rng

        async def one(w: str) -> int:
            new = [rng.getrandbits(64) for _ in range(k)]
            old = self.held[w][:k]
            self.held[w] = self.held[w][len(old):] + new
            batch = [BlockStored(block_hashes=new)]
            if old:
                batch.append(BlockRemoved(block_hashes=old))
            await idx.apply(w, batch)
            return len(new) + len(old)

        events = 0
        done = 0
        while done < n:
            group = [self.workers[(self.next + j) % len(self.workers)]
                     for j in range(min(self.args.in_flight, n - done))]
            self.next += len(group)
            done += len(group)
            events += sum(await asyncio.gather(*[one(w) for w in group]))
        return events

    async def round(self) -> dict[str, Any]:
        s0 = _node_stats(self.ports)
        time.sleep(1.0)
        s1 = _node_stats(self.ports)
        idle = {p: s1[p][1] - s0[p][1] for p in s1}
        n = max(self.args.events // (2 * self.args.step_stored), 1)
        c0, t0 = time.process_time(), time.perf_counter()
        events = await self.steps(n)
        client_cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        s2 = _node_stats(self.ports)
        prim = [p for p in s2 if s2[p][0]]
        cpu = sum(max(s2[p][1] - s1[p][1] - idle[p] * wall, 1e-9) for p in prim)
        replica_cpu = sum(s2[p][1] - s1[p][1] for p in s2 if not s2[p][0])
        calls = sum(s2[p][2] - s1[p][2] for p in prim)
        return {"events": events, "wall_s": round(wall, 2),
                "redis_us_per_event": round(cpu * 1e6 / events, 2),
                "events_per_primary_cpu_s": round(events / cpu),
                "replica_us_per_event": round(replica_cpu * 1e6 / events, 2),
                "writer_us_per_event": round(client_cpu * 1e6 / events, 2),
                "commands_per_event": round(calls / events, 3)}


async def _run(targets: list[_Target], rounds: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for t in targets:
        await t.open()
        await t.fill()
        print(f"{t.name}: filled", file=sys.stderr, flush=True)
    try:
        for r in range(rounds):
            for t in targets if r % 2 == 0 else reversed(targets):
                res = await t.round()
                out[t.name].append(res)
                print(f"round {r} {t.name}: {res}", file=sys.stderr, flush=True)
    finally:
        for t in targets:
            await t.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"of {', '.join(SETUPS)}")
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=1_000_000, help="indexed pairs before writing")
    ap.add_argument("--bucket-bits", type=int, default=15)
    ap.add_argument("--step-stored", type=int, default=16, help="blocks stored per engine step")
    ap.add_argument("--in-flight", type=int, default=16, help="steps written at once")
    ap.add_argument("--events", type=int, default=200_000, help="block events per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("bench/results/index_write_cost.json"))
    args = ap.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    if not setups or (unknown := set(setups) - set(SETUPS)):
        ap.error(f"--setups: some of {', '.join(SETUPS)}")
    for name in ("workers", "pairs", "step_stored", "in_flight", "events", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 8 <= args.bucket_bits <= 24:
        ap.error("--bucket-bits must be in 8..24")
    from services.controller.redis_server import RedisServer

    started = time.time()
    with contextlib.ExitStack() as stack:
        targets = []
        if {"single", "baseline"} & set(setups):
            for name in ("single", "baseline"):
                if name in setups:
                    d = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="splitserve-wc-")))
                    srv = RedisServer(d)
                    srv.start()
                    stack.callback(srv.stop)
                    targets.append(_Target(name, srv.url, [srv.port], args))
        if {"cluster_one_slot", "cluster"} & set(setups):
            bare = stack.enter_context(redis_cluster(3, 0, extra=["--cluster-node-timeout", "30000"]))
            for name in ("cluster_one_slot", "cluster"):
                if name in setups:
                    targets.append(_Target(name, bare.url, bare.ports, args))
        if "cluster_replicated" in setups:
            repl = stack.enter_context(redis_cluster(3, 1, extra=["--cluster-node-timeout", "30000"]))
            repl.wait_replicated()
            targets.append(_Target("cluster_replicated", repl.url, repl.ports, args))
        order = {n: i for i, n in enumerate(SETUPS)}
        targets.sort(key=lambda t: order[t.name])
        runs = asyncio.run(_run(targets, args.rounds))
    summary = {name: {k: round(statistics.median(r[k] for r in rs), 3)
                      for k in ("redis_us_per_event", "events_per_primary_cpu_s",
                                "replica_us_per_event", "writer_us_per_event",
                                "commands_per_event")}
               for name, rs in runs.items()}
    print(f"{'':20} {'redis us/ev':>11} {'ev/primary-cpu-s':>17} {'replica us/ev':>13} "
          f"{'writer us/ev':>12} {'cmds/ev':>8}   (medians of {args.rounds} rounds)")
    for name, s in summary.items():
        print(f"{name:20} {s['redis_us_per_event']:>11} {s['events_per_primary_cpu_s']:>17,.0f} "
              f"{s['replica_us_per_event']:>13} {s['writer_us_per_event']:>12} "
              f"{s['commands_per_event']:>8}")
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "wall_s": round(time.time() - started, 1), "runs": runs, "median": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json_text.dumps(out))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
