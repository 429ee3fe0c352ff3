"""gRPC vs SSE: the same seeded workload streamed through the public gRPC API and through the
OpenAI endpoint's server-sent events, against one cluster, in one run.

    python -m bench.api_compare                      # starts a disaggregated cluster itself
    python -m bench.api_compare --http http://127.0.0.1:8000 --grpc 127.0.0.1:50051

Rounds alternate the order (http, grpc, grpc, http, ...) so neither API always runs on a warmer
cluster; the figures pool every round's requests: output tokens/s of wall time (median over
rounds) and time to first token percentiles. Results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import json_text
from bench.client import ClientConfig, RequestResult, RunResult, run_workload, warm_up
from bench.stats import Percentiles, summarize
from bench.workload import SyntheticConfig


def compare(http: str, grpc_target: str, ns: argparse.Namespace) -> dict[str, Any]:
    workload = SyntheticConfig(requests=ns.requests, isl=ns.isl, isl_spread=ns.isl // 4,
                               osl=ns.osl, api=ns.endpoint, seed=ns.seed).build()
    base = dict(base_url=http, grpc_target=grpc_target, concurrency=ns.concurrency,
                max_seconds=ns.max_seconds)
    cfgs = {api: ClientConfig(api=api, **base) for api in ("http", "grpc")}
    runs: dict[str, list[RunResult]] = {"http": [], "grpc": []}

    async def go() -> None:
        await warm_up(cfgs["http"], 2)
        for api in ("http", "grpc"):  # one unmeasured pass each: connections, compilation
            await run_workload(workload, cfgs[api].model_copy(update={"max_seconds": 300}))
        for r in range(ns.rounds):
            order = ("http", "grpc") if r % 2 == 0 else ("grpc", "http")
            for api in order:
                run = await run_workload(workload, cfgs[api])
                runs[api].append(run)
                s = summarize(run)
                print(f"round {r} {api:4}: {s.output_tok_s:7.1f} tok/s  ttft p50 "
                      f"{s.ttft_ms.p50:7.1f} ms  errors {s.errors}", file=sys.stderr, flush=True)

    asyncio.run(go())
    out: dict[str, Any] = {"workload": workload.config, "concurrency": ns.concurrency,
                           "rounds": ns.rounds, "apis": {}}
    for api, rs in runs.items():
        ok: list[RequestResult] = [x for run in rs for x in run.results if x.ok]
        stats = [summarize(run) for run in rs]
        out["apis"][api] = {
            "requests": sum(s.requests for s in stats),
            "errors": sum(s.errors for s in stats),
            "output_tok_s_median": statistics.median(s.output_tok_s for s in stats),
            "output_tok_s_per_round": [round(s.output_tok_s, 1) for s in stats],
            "ttft_ms": Percentiles.of_seconds(x.ttft_s for x in ok
                                              if x.ttft_s is not None).model_dump(),
            "itl_ms": Percentiles.of_seconds(t for x in ok for t in x.itl_s).model_dump(),
            "e2e_ms": Percentiles.of_seconds(x.e2e_s for x in ok
                                             if x.e2e_s is not None).model_dump(),
        }
    return out


def table(res: dict[str, Any]) -> str:
    rows = ["| API | output tok/s (median of rounds) | TTFT p50 ms | TTFT p90 ms | ITL p50 ms "
            "| e2e p50 ms | errors |", "|---|---|---|---|---|---|---|"]
    for api, a in res["apis"].items():
        name = "gRPC (splitserve.v1)" if api == "grpc" else "HTTP SSE (OpenAI)"
        rows.append(f"| {name} | {a['output_tok_s_median']:.1f} | {a['ttft_ms']['p50']:.1f} | "
                    f"{a['ttft_ms']['p90']:.1f} | {a['itl_ms']['p50']:.2f} | "
                    f"{a['e2e_ms']['p50']:.1f} | {a['errors']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", help="gateway HTTP root (default: start a cluster)")
    p.add_argument("--grpc", help="gateway gRPC host:port (with --http)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--isl", type=int, default=128, help="prompt words")
    p.add_argument("--osl", type=int, default=64, help="output tokens (ignore_eos)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="chat")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--up-args", default="", help="more `splitserve up` flags")
    p.add_argument("--cache-dir", type=Path, help="built-in models, compiled kernels")
    p.add_argument("--json", type=Path, help="write the figures here")
    ns = p.parse_args()
    cluster = None
    if ns.http:
        if not ns.grpc:
            p.error("--http needs --grpc")
        http, target = ns.http, ns.grpc
    else:
        from services.controller.config import default_cache_dir
        from services.controller.launcher import start_cluster

        run_dir = Path(tempfile.mkdtemp(prefix="splitserve-api-compare-")) / "run"
        cluster = start_cluster(ns.up_args.split(), run_dir,
                                ns.cache_dir or default_cache_dir())
        http, target = cluster.http, cluster.grpc
        assert target, "the cluster does not serve gRPC"
    try:
        res = compare(http, target, ns)
    finally:
        if cluster is not None:
            cluster.stop()
    print(table(res))
    if ns.json:
        ns.json.write_text(json_text.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
