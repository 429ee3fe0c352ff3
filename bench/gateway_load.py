"""Gateway load test: many concurrent streaming clients against one gateway, zero errors wanted.

    python -m bench.gateway_load --url http://127.0.0.1:8000 --clients 500 --requests 1000

Each client streams a short synthetic completion (`--isl` words, exactly `--osl` tokens) with
bench/client.py's SSE client; `--clients` of them are in flight at once (one HTTP connection
each). While it runs, the gateway's own in-flight gauge (`/metrics`) and, when the gateway runs
on this machine, its process's RSS and open file descriptors are sampled. The report (JSON on
stdout, or `--json FILE`) holds the client-side figures (errors, TTFT, tok/s) and the gateway's
peaks. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from typing import Any

import httpx
import psutil
from pydantic import BaseModel, Field

from bench.client import ClientConfig, run_workload, warm_up
from bench.stats import Percentiles, summarize
from bench.workload import build_workload

IN_FLIGHT = re.compile(r"^splitserve_gateway_requests_in_flight (\S+)$", re.M)


class GatewaySamples(BaseModel):
    """What the gateway looked like under load (peaks over the run)."""

    peak_in_flight: int = Field(description="highest requests_in_flight gauge seen")
    pid: int | None = Field(None, description="gateway process (None: not on this machine)")
    rss_mib_before: float | None = Field(None, description="RSS before the run")
    rss_mib_peak: float | None = Field(None, description="highest RSS seen during the run")
    fds_before: int | None = Field(None, description="open file descriptors before the run")
    fds_peak: int | None = Field(None, description="most open file descriptors seen")
    cpu_s: float | None = Field(None, description="CPU seconds the gateway spent in the run")


class LoadReport(BaseModel):
    """One gateway load test."""

    clients: int = Field(description="concurrent streaming clients")
    requests: int = Field(description="requests sent")
    errors: int = Field(description="failed requests (non-200, error event, no [DONE], ...)")
    error_samples: list[str] = Field(description="first few error texts")
    osl: int = Field(description="output tokens per request")
    ttft_ms: Percentiles = Field(description="time to first token")
    e2e_ms: Percentiles = Field(description="send to end of stream")
    output_tokens: int = Field(description="tokens received by successful requests")
    output_tok_s: float = Field(description="output tokens per second of wall time")
    wall_s: float = Field(description="first send to last end")
    gateway: GatewaySamples = Field(description="gateway-side samples")
    client_fd_limit: int = Field(description="this process's open-files limit")


def gateway_process(url: str) -> psutil.Process | None:
    """The local process listening on the gateway's port, if it can be seen."""
    port = httpx.URL(url).port or 80
    for proc in psutil.process_iter(["cmdline"]):
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return proc
        except psutil.Error:
            continue
    return None


async def sample(url: str, proc: psutil.Process | None, out: dict[str, Any],
                 stop: asyncio.Event, every_s: float = 0.1) -> None:
    """Poll the in-flight gauge, RSS and open fds until `stop`."""
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as h:
        while not stop.is_set():
            try:
                m = IN_FLIGHT.search((await h.get("/metrics")).text)
                if m:
                    out["peak_in_flight"] = max(out["peak_in_flight"], int(float(m.group(1))))
            except httpx.HTTPError:
                pass
            if proc is not None:
                try:
                    out["rss"] = max(out["rss"], proc.memory_info().rss)
                    out["fds"] = max(out["fds"], proc.num_fds())
                except psutil.Error:
                    proc = None
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass


def raise_fd_limit(want: int) -> int:
    """Raise this process's soft open-files limit towards `want` (one socket per client)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        soft = min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


async def run(ns: argparse.Namespace) -> LoadReport:
    fd_limit = raise_fd_limit(ns.clients * 2 + 256)
    cfg = ClientConfig(base_url=ns.url, model=ns.model, api_key=ns.api_key,
                       concurrency=ns.clients, max_seconds=ns.max_seconds,
                       request_timeout_s=ns.max_seconds)
    workload = build_workload("synthetic", requests=ns.requests, isl=ns.isl,
                              isl_spread=max(0, min(ns.isl - 1, ns.isl // 2)), osl=ns.osl,
                              seed=ns.seed)
    await warm_up(cfg, 2)  # first-request costs (connections, compilation) do not count
    proc = gateway_process(ns.url)
    before = (proc.memory_info().rss, proc.num_fds(), sum(proc.cpu_times()[:2])) if proc \
        else None
    seen: dict[str, Any] = {"peak_in_flight": 0, "rss": 0, "fds": 0}
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(cfg.root, proc, seen, stop))
    result = await run_workload(workload, cfg)
    stop.set()
    await sampler
    stats = summarize(result)
    gw = GatewaySamples(peak_in_flight=seen["peak_in_flight"])
    if proc is not None and before is not None:
        try:
            cpu = sum(proc.cpu_times()[:2]) - before[2]
        except psutil.Error:
            cpu = None
        gw = GatewaySamples(peak_in_flight=seen["peak_in_flight"], pid=proc.pid,
                            rss_mib_before=round(before[0] / 2**20, 1),
                            rss_mib_peak=round(seen["rss"] / 2**20, 1), fds_before=before[1],
                            fds_peak=seen["fds"], cpu_s=None if cpu is None else round(cpu, 1))
    return LoadReport(clients=ns.clients, requests=stats.requests + stats.unsent,
                      errors=stats.errors + stats.unsent, error_samples=stats.error_samples,
                      osl=ns.osl, ttft_ms=stats.ttft_ms, e2e_ms=stats.e2e_ms,
                      output_tokens=stats.output_tokens,
                      output_tok_s=round(stats.output_tok_s, 1), wall_s=round(stats.wall_s, 2),
                      gateway=gw, client_fd_limit=fd_limit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=500, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=1000, help="requests in all")
    p.add_argument("--isl", type=int, default=8, help="prompt length in words")
    p.add_argument("--osl", type=int, default=16, help="output tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="default: the gateway's first model")
    p.add_argument("--api-key", help="bearer token when the gateway has API keys")
    p.add_argument("--max-seconds", type=float, default=600.0, help="limit on the run")
    p.add_argument("--json", dest="json_path", help="write the report here too")
    ns = p.parse_args(argv)
    if ns.clients < 1 or ns.requests < 1:
        print("gateway_load: --clients and --requests must be positive", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        report = asyncio.run(run(ns))
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        print(f"gateway_load: cannot load {ns.url}: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report.model_dump(mode="json"), indent=2)
    print(text)
    if ns.json_path:
        with open(ns.json_path, "w") as f:
            f.write(text + "\n")
    print(f"{report.requests} requests, {report.errors} errors, {ns.clients} clients, "
          f"{time.monotonic() - start:.0f} s", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
