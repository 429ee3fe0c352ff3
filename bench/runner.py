"""One benchmark invocation: build the workload once, run it against each target, report.

Targets:

- ``url``: any OpenAI-compatible server that is already running (with its Redis URL, the
  engines' prefix-cache counters are read too; without, the prefix hit rate is None);
- ``compare``: for each value of one `splitserve up` flag (e.g. ``policy=kv,round_robin``),
  start a cluster with ``--<flag> <value>`` plus ``up_args``, run, stop it, then the next
  (one at a time: a small machine cannot hold two);
- neither: one cluster started with ``up_args``;
- ``target="vllm"``: vLLM's own OpenAI server, with the engine settings, environment and
  core binding of the cluster's first worker (:mod:`bench.vllm_server`), as the baseline,
  against one cluster; both stay up and take turns at every step of the sweep (the order
  alternating), so both see the same machine conditions.

``concurrencies`` with more than one value is a sweep: each target runs the workload once per
value (labels ``<target>@c<N>``), and ratios compare runs at the same concurrency.

``--compare mode=...`` compares at the same total cores: aggregated clusters get as many
workers as the disaggregated ones have prefill + decode workers (each engine is bound to one
core, in the same order), unless ``--workers`` is given, and unequal engine counts are refused.

Every run sends the identical, seeded workload (same fingerprint in each run's config).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.markup import escape

from bench.client import ClientConfig, run_workload, warm_up
from bench.cpu_usage import cpu_seconds, usage
from bench.engine_metrics import (EndpointSource, KvTransferReport, PrefixCacheReport,
                                  kv_transfer_report, prefix_cache_report, registry_endpoints,
                                  scrape_settled, server_endpoints)
from bench.queue_timeline import sample_queues, summarize_requests, summarize_timeline
from bench.report import BenchReport, RunReport, make_report, progress
from bench.stats import summarize
from bench.workload import Workload, scenario_config
from router.registry import DEFAULT_NAMESPACE


class BenchConfig(BaseModel):
    """Everything one `splitserve bench` invocation does."""

    scenario: str = Field("prefix-reuse", description="workload scenario name")
    scenario_params: dict[str, Any] = Field(default_factory=dict,
                                            description="scenario fields (seed included)")
    url: str | None = Field(None, description="benchmark this running server; no cluster")
    redis_url: str | None = Field(None, description="the --url server's Redis (prefix hits)")
    namespace: str = Field(DEFAULT_NAMESPACE, description="registry namespace in that Redis")
    compare_key: str | None = Field(None, description="`splitserve up` flag to vary")
    compare_values: list[str] = Field(default_factory=list, description="its values, in order")
    up_args: list[str] = Field(default_factory=list, description="more `splitserve up` flags")
    label: str | None = Field(None, description="run label without --compare")
    baseline: str | None = Field(None, description="label of the ratios' baseline run")
    model: str | None = Field(None, description="model name (default: the server's first)")
    api_key: str | None = Field(None, description="bearer token for --url servers")
    concurrency: int = Field(8, ge=1, description="most requests in flight")
    concurrencies: list[int] = Field(default_factory=list, description=(
        "a sweep: run the workload once per value (default: [concurrency])"))
    rounds: int = Field(1, ge=1, description=(
        "paired rounds per concurrency, each a fresh workload that every side runs in turn "
        "(order alternating): with --target vllm, or with --compare of a gateway setting "
        "(one cluster, a gateway per value); ratios per round and their spread"))
    target: str = Field("splitserve", description=(
        "splitserve: the cluster(s); vllm: vLLM's own server first, as the baseline"))
    request_rate: float | None = Field(None, gt=0, description="mean requests/s (Poisson)")
    max_seconds: float = Field(600.0, gt=0, description="limit on each run's duration")
    request_timeout_s: float = Field(300.0, gt=0, description="limit per request")
    warmup: int = Field(1, ge=0, description="unmeasured warm-up requests before each run")
    run_dir: Path | None = Field(None, description="where started clusters keep their runs")
    cache_dir: Path | None = Field(None, description="built-in models, compiled kernels")
    cluster_timeout_s: float = Field(600.0, gt=0, description="limit on a cluster's start")

    @property
    def sweep(self) -> list[int]:
        return self.concurrencies or [self.concurrency]

    def client(self, base_url: str, concurrency: int | None = None,
               cache_salt: str | None = None) -> ClientConfig:
        return ClientConfig(base_url=base_url, model=self.model, api_key=self.api_key,
                            concurrency=concurrency or self.concurrency, cache_salt=cache_salt,
                            request_rate=self.request_rate,
                            max_seconds=self.max_seconds,
                            request_timeout_s=self.request_timeout_s,
                            seed=int(self.scenario_params.get("seed", 0)))


def parse_compare(spec: str) -> tuple[str, list[str]]:
    """`policy=kv,round_robin` -> ("policy", ["kv", "round_robin"]); values that hold commas
    themselves are separated by semicolons (`kv-scorer-weights=ttft=1,shared_step=1;ttft=1`)."""
    key, sep, values = spec.partition("=")
    key = key.strip().removeprefix("--")
    vals = [v.strip() for v in values.split(";" if ";" in values else ",") if v.strip()]
    if not sep or not key or not vals:
        raise ValueError(f"--compare wants KEY=V1,V2,... (got {spec!r})")
    if len(set(vals)) != len(vals):
        raise ValueError(f"--compare values repeat: {spec!r}")
    return key, vals


def parse_concurrency(spec: str) -> list[int]:
    """`8` -> [8]; `1,2,4,8` -> a sweep (positive, distinct, in the order given)."""
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--concurrency wants N or N1,N2,... (got {spec!r})") from None
    if not vals or any(v < 1 for v in vals) or len(set(vals)) != len(vals):
        raise ValueError(f"--concurrency wants distinct positive integers (got {spec!r})")
    return vals


def engines_of(up_args: list[str]) -> int:
    """How many engines (one core each on CPU) `splitserve up UP_ARGS` starts."""
    from services.cli import build_parser

    ns = build_parser().parse_args(["up", *up_args])
    return ns.workers if ns.mode == "aggregated" else ns.prefill + ns.decode


def cluster_plan(cfg: BenchConfig) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(label, `splitserve up` args, config extras) per cluster to start, in order."""
    if not cfg.compare_key:
        return [(cfg.label or "splitserve", list(cfg.up_args), {})]
    flag = "--" + cfg.compare_key.replace("_", "-")
    plan = [(v, [flag, v, *cfg.up_args], {cfg.compare_key: v}) for v in cfg.compare_values]
    if cfg.compare_key == "mode":
        # Same total cores: as many aggregated workers as disaggregated engines.
        has_workers = any(a == "--workers" or a.startswith("--workers=") for a in cfg.up_args)
        disagg = [args for v, args, _ in plan if v == "disaggregated"]
        if not has_workers and disagg:
            n = engines_of(disagg[0])
            plan = [(v, [*args, "--workers", str(n)] if v == "aggregated" else args, extra)
                    for v, args, extra in plan]
        counts = {v: engines_of(args) for v, args, _ in plan}
        if len(set(counts.values())) > 1:
            raise ValueError("--compare mode=... must compare the same total cores; engines: "
                             + ", ".join(f"{k}={n}" for k, n in counts.items()))
    return plan


def _namespace(up_args: list[str], default: str) -> str:
    for i, a in enumerate(up_args):
        if a == "--namespace" and i + 1 < len(up_args):
            return up_args[i + 1]
        if a.startswith("--namespace="):
            return a.split("=", 1)[1]
    return default


async def measure(label: str, base_url: str, engines: EndpointSource | None,
                  workload: Workload, cfg: BenchConfig, config: dict[str, Any],
                  console: Console, concurrency: int | None = None,
                  target: str = "", root_pid: int | None = None,
                  registry: tuple[str, str] | None = None,
                  cache_salt: str | None = None) -> RunReport:
    """Warm up, snapshot the engines' counters (and the CPU time of the target's processes,
    when this benchmark started it), run the workload, snapshot again. With `registry`
    (Redis URL, namespace) every worker's published load is sampled during the run (the
    per-worker queue timeline); with `cache_salt`, every request carries it."""
    client = cfg.client(base_url, concurrency, cache_salt)
    await warm_up(client, cfg.warmup)
    before = None
    if engines is not None:
        before = await scrape_settled(engines)
    cpu_before = cpu_seconds(root_pid) if root_pid else None
    t0 = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        timeline = (await stack.enter_async_context(sample_queues(*registry))
                    if registry else None)
        with progress(console, label, len(workload.requests)) as on_result:
            run = await run_workload(workload, client, on_result)
    cores = (usage(cpu_before, cpu_seconds(root_pid), time.perf_counter() - t0)
             if root_pid and cpu_before is not None else {})
    prefix: PrefixCacheReport | None = None
    kv: KvTransferReport | None = None
    if engines is not None and before is not None:
        after = await scrape_settled(engines)
        prefix = prefix_cache_report(before, after)
        kv = kv_transfer_report(before, after)
    stats = summarize(run)
    config = {**config, "model": run.model, "concurrency": client.concurrency}
    report = RunReport.build(label, config, stats, prefix, kv, target=target or label,
                             concurrency=client.concurrency)
    report.cores_used = cores
    if timeline is not None:
        report.queue_timeline = timeline
        report.queue_summary = summarize_timeline(timeline)
    report.request_summary = summarize_requests(report.samples)
    return report


def workload_config(workload: Workload, cfg: BenchConfig) -> dict[str, Any]:
    return {"scenario": workload.scenario, "scenario_config": workload.config,
            "workload_requests": len(workload.requests),
            "workload_sha256": workload.fingerprint(),
            "request_rate": cfg.request_rate, "max_seconds": cfg.max_seconds}


def stop_starting_cluster(run_dir: Path, timeout_s: float = 90) -> None:
    """Interrupted while a cluster was starting: stop our `splitserve up` child for `run_dir`
    (by PID, as an operator's Ctrl-C; killed if it does not stop)."""
    import signal

    import psutil

    for child in psutil.Process().children():
        try:
            if str(run_dir) not in " ".join(child.cmdline()):
                continue
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout_s)
            except psutil.TimeoutExpired:
                for p in [*child.children(recursive=True), child]:
                    p.kill()
        except psutil.Error:
            pass


def _measure_all(target: str, url: str, engines: EndpointSource | None,
                 workload: Workload, cfg: BenchConfig, config: dict[str, Any],
                 err: Console, root_pid: int | None = None,
                 registry: tuple[str, str] | None = None) -> list[RunReport]:
    """One run per concurrency of the sweep against one target. Each step of a sweep sends
    its own workload (seed + step), so no step finds the previous one's prompts in the prefix
    cache; every target gets the same workload at the same step."""
    sweep = cfg.sweep
    runs = []
    for i, c in enumerate(sweep):
        wl = workload if i == 0 else workload_for_step(cfg, i)
        cfg_i = config if i == 0 else {**config, **workload_config(wl, cfg)}
        runs.append(asyncio.run(measure(target if len(sweep) == 1 else f"{target}@c{c}", url,
                                        engines, wl, cfg, cfg_i, err, c, target,
                                        root_pid, registry)))
    return runs


def workload_for_step(cfg: BenchConfig, step: int) -> Workload:
    params = {**cfg.scenario_params}
    params["seed"] = int(params.get("seed", 0)) + step
    return scenario_config(cfg.scenario, params).build()


def run_bench(cfg: BenchConfig, err: Console) -> tuple[BenchReport, str | None]:
    """Run every target; returns the report and, if a run could not be done, why (the
    report then holds the runs done before it)."""
    workload = scenario_config(cfg.scenario, cfg.scenario_params).build()
    base = workload_config(workload, cfg)
    err.print(f"workload: {workload.scenario}, {len(workload.requests)} requests in "
              f"{workload.conversations} conversation(s), sha256 {workload.fingerprint()[:16]}")
    runs: list[RunReport] = []
    if cfg.url:
        label = cfg.label or "url"
        try:
            engines = (registry_endpoints(cfg.redis_url, cfg.namespace) if cfg.redis_url
                       else None)
            runs += _measure_all(label, cfg.url, engines, workload, cfg,
                                 {**base, "target": cfg.url}, err,
                                 registry=(cfg.redis_url, cfg.namespace) if cfg.redis_url
                                 else None)
        except Exception as exc:
            return make_report(runs), f"{label}: the run failed: {type(exc).__name__}: {exc}"
        return make_report(runs), None

    from services.controller.config import default_cache_dir
    from services.controller.launcher import start_cluster

    cache_dir = cfg.cache_dir or default_cache_dir()
    root = cfg.run_dir or Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    plan = cluster_plan(cfg)
    namespace = _namespace(cfg.up_args, DEFAULT_NAMESPACE)
    failure: str | None = None
    if cfg.target == "vllm":
        failure = _run_vllm(cfg, plan[0], root, cache_dir, workload, base, runs, err,
                            namespace)
        plan = []
    elif cfg.compare_key and cfg.rounds > 1:
        from bench.gateway_rounds import run_gateway_rounds

        failure = run_gateway_rounds(cfg, plan, root, cache_dir, workload, base, runs, err,
                                     namespace)
        plan = []
    for i, (label, args, extra) in enumerate(plan):
        if failure:
            break
        # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
        run_dir = root / f"c{i}"
        err.print(f"[bold]{escape(label)}[/bold]: starting `splitserve up "
                  f"{escape(' '.join(args))}` (logs: {run_dir.parent / (run_dir.name + '.out')})")
        try:
            cluster = start_cluster(args, run_dir, cache_dir, cfg.cluster_timeout_s)
        except KeyboardInterrupt:
            stop_starting_cluster(run_dir)
            raise
        except (RuntimeError, TimeoutError) as exc:
            failure = f"{label}: the cluster did not start: {str(exc)[-2000:]}"
            break
        try:
            err.print(f"[bold]{escape(label)}[/bold]: cluster ready at {cluster.http}")
            runs += _measure_all(label, cluster.http,
                                 registry_endpoints(cluster.redis_url, namespace), workload, cfg,
                                 {**base, **extra, "target": "cluster", "up_args": args},
                                 err, cluster.proc.pid, (cluster.redis_url, namespace))
        except Exception as exc:
            failure = f"{label}: the run failed: {type(exc).__name__}: {exc}"
        finally:
            code = cluster.stop()
            if code != 0:
                err.print(f"[yellow]{escape(label)}: splitserve up exited {code}[/yellow]")
    targets = {r.target for r in runs}
    baseline = cfg.baseline if cfg.baseline in targets else None
    return make_report(runs, baseline), failure


def _run_vllm(cfg: BenchConfig, cluster_spec: tuple[str, list[str], dict[str, Any]],
              root: Path, cache_dir: Path, workload: Workload, base: dict[str, Any],
              runs: list[RunReport], err: Console, namespace: str) -> str | None:
    """The vLLM baseline against one cluster, interleaved: both are started, then at each
    step of the sweep both run the step's workload back to back (the order alternating
    between steps), so the two sides see the same machine conditions. Both engines are bound
    to the same core; the one not measured sits idle. Why it failed, or None."""
    from services.controller.launcher import start_cluster

    from bench.vllm_server import engine_config, planned_engines, server_args, start_vllm_server

    label, args, extra = cluster_spec
    eng = engine_config(cfg.up_args, cache_dir)
    err.print(f"[bold]vllm[/bold]: starting vLLM's OpenAI server (logs: {root / 'v'})")
    try:
        server = start_vllm_server(eng, root / "v", cache_dir, cfg.cluster_timeout_s,
                                   planned_engines(cfg.up_args))
    except (RuntimeError, TimeoutError) as exc:
        return f"vllm: the server did not start: {str(exc)[-2000:]}"
    cluster = None
    try:
        err.print(f"[bold]{escape(label)}[/bold]: starting `splitserve up "
                  f"{escape(' '.join(args))}` (logs: {root / 'c0.out'})")
        try:
            cluster = start_cluster(args, root / "c0", cache_dir, cfg.cluster_timeout_s)
        except KeyboardInterrupt:
            stop_starting_cluster(root / "c0")
            raise
        except (RuntimeError, TimeoutError) as exc:
            return f"{label}: the cluster did not start: {str(exc)[-2000:]}"
        sides = [("vllm", server.url, server_endpoints(f"{server.url}/metrics"),
                  server.proc.pid,
                  {**base, "target": "vllm", "vllm_args": server_args(eng, 0, "ipc://...")}),
                 (label, cluster.http, registry_endpoints(cluster.redis_url, namespace),
                  cluster.proc.pid,
                  {**base, **extra, "target": "cluster", "up_args": args})]
        sweep = cfg.sweep
        done: list[RunReport] = []
        for i, c in enumerate(sweep):
            for k in range(cfg.rounds):
                step = i * cfg.rounds + k  # every step and round sends prompts of its own
                wl = workload if step == 0 else workload_for_step(cfg, step)
                for name, url, engines, pid, config in (sides if step % 2 == 0
                                                          else sides[::-1]):
                    cfg_i = config if step == 0 else {**config, **workload_config(wl, cfg)}
                    run_label = name if len(sweep) == 1 else f"{name}@c{c}"
                    if cfg.rounds > 1:
                        run_label += f"#{k + 1}"
                    try:
                        report = asyncio.run(measure(
                            run_label, url, engines, wl, cfg,
                            {**cfg_i, "order_in_step": (len(done) % 2)}, err, c, name, pid))
                        report.round = k + 1 if cfg.rounds > 1 else None
                        done.append(report)
                    except Exception as exc:
                        return f"{name}: the run failed: {type(exc).__name__}: {exc}"
                    finally:
                        order = {"vllm": 0, label: 1}
                        runs[:] = [*[r for r in runs if r.target not in order],
                                   *sorted(done, key=lambda r: (
                                       order[r.target], sweep.index(r.concurrency or 0),
                                       r.round or 0))]
        return None
    finally:
        if cluster is not None:
            code = cluster.stop()
            if code != 0:
                err.print(f"[yellow]{escape(label)}: splitserve up exited {code}[/yellow]")
        server.stop()


__all__ = ["BenchConfig", "cluster_plan", "measure", "parse_compare", "parse_concurrency",
           "run_bench"]
