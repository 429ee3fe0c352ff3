"""`splitserve bench` arguments and entry point (imports of the heavy parts are deferred, so
that building the `splitserve` parser stays cheap)."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from bench.workload import SCENARIOS
from router.registry import DEFAULT_NAMESPACE

# CLI flag -> scenario field; only flags given on the command line are passed, and a flag the
# chosen scenario has no field for is an error.
SCENARIO_FLAGS = ("requests", "conversations", "turns", "system_prompts", "isl", "isl_spread",
                  "osl", "osl_spread", "seed")


OPEN_LOOP = ("mixed",)
"""Scenarios whose requests carry arrival times: a concurrency limit would distort them."""
OPEN_LOOP_CONCURRENCY = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench subcommand's flags."""
    tgt = p.add_argument_group("target (default: start one cluster with --up-args)")
    tgt.add_argument("--url", help="an OpenAI-compatible server to load (no cluster started)")
    tgt.add_argument("--redis-url", help="with --url: its cluster's Redis, to read the "
                     "engines' prefix-cache counters (without it prefix_hit_rate is null)")
    tgt.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Redis key namespace")
    tgt.add_argument("--compare", metavar="KEY=V1,V2,...",
                     help="start one cluster per value of `splitserve up --KEY`, run the same "
                     "workload on each, report ratios against the first (e.g. policy=kv,"
                     "round_robin; values holding commas: separated by semicolons)")
    tgt.add_argument("--up-args", default="", help='more `splitserve up` flags for clusters '
                     'bench starts, one string (e.g. "--mode aggregated --workers 2")')
    tgt.add_argument("--run-dir", help="where started clusters keep logs (default: new tmp dir)")
    tgt.add_argument("--cache-dir", help="built-in models, compiled kernels")
    tgt.add_argument("--target", choices=["splitserve", "vllm"], default="splitserve",
                     help="vllm: first run vLLM's own OpenAI server with the engine settings "
                     "and core of the cluster's first worker, as the ratios' baseline (the "
                     "gateway's overhead: use with --up-args \"--mode aggregated --workers 1\")")
    tgt.add_argument("--label", help="run label without --compare")
    tgt.add_argument("--baseline", help="label of the ratios' baseline (default: first run)")

    wl = p.add_argument_group("workload")
    wl.add_argument("--scenario", default="prefix-reuse", choices=sorted(SCENARIOS),
                    help="prefix-reuse (multi-turn chats sharing long system prompts), "
                    "prefix-reuse-shared (the same with a few system prompts every worker "
                    "caches), doc-qa (a few long shared documents, many short questions), "
                    "many-tenants (many system prompts, little sharing), synthetic "
                    "(independent prompts, ISL/OSL ± spread) or mixed (a steady stream of chat "
                    "turns while long prompts arrive); for NIXL transfer bandwidth see "
                    "`python -m bench.kv_transfer`")
    wl.add_argument("--seed", type=int, help="workload seed (default 0)")
    wl.add_argument("--requests", type=int, help="synthetic, many-tenants: number of requests")
    wl.add_argument("--conversations", type=int, help="prefix-reuse: conversations")
    wl.add_argument("--turns", type=int, help="prefix-reuse: turns per conversation")
    wl.add_argument("--system-prompts", type=int, help="prefix-reuse(-shared): shared system "
                    "prompts")
    wl.add_argument("--isl", type=int, help="synthetic: mean prompt length (words)")
    wl.add_argument("--isl-spread", type=int, help="synthetic: prompt length spread (words)")
    wl.add_argument("--osl", type=int, help="output tokens per request")
    wl.add_argument("--osl-spread", type=int, help="synthetic: output length spread (tokens)")
    wl.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other scenario field (repeatable), e.g. --set user_words=60")

    cl = p.add_argument_group("client")
    cl.add_argument("--concurrency", metavar="N[,N2,...]",
                    help="most requests in flight (default 8; open-loop scenarios such as "
                    "mixed: no limit but their arrival times); a list (e.g. 1,2,4,8,16,32) is "
                    "a sweep: one run per value on each target")
    cl.add_argument("--rounds", type=int, default=1,
                    help="paired rounds per concurrency (each round a fresh workload every "
                    "side runs in turn, the order rotating); the report gives every round's "
                    "ratios, their median, min and max, and a paired interval. With --target "
                    "vllm; or with --compare of a gateway setting (e.g. policy=kv,round_robin,"
                    "least_loaded): one cluster, a gateway per value, each run with a "
                    "cache_salt of its own. On a shared, noisy machine many short paired "
                    "rounds measure a ratio better than one long run")
    cl.add_argument("--request-rate", type=float, help="mean requests/s, Poisson arrivals "
                    "(default: as fast as --concurrency allows)")
    cl.add_argument("--max-seconds", type=float, default=600.0, help="limit on each run")
    cl.add_argument("--request-timeout", type=float, default=300.0, help="limit per request")
    cl.add_argument("--warmup", type=int, default=1, help="unmeasured requests before a run")
    cl.add_argument("--model", help="model name (default: the server's first listed)")
    cl.add_argument("--api-key", help="bearer token for --url servers")
    out = p.add_argument_group("output")
    out.add_argument("--json", dest="json_path", metavar="FILE", help="write the report here")
    out.add_argument("--markdown", dest="markdown_path", metavar="FILE",
                     help="write the metric table as markdown here")
    out.add_argument("--plots", dest="plots_prefix", metavar="PREFIX",
                     help="write PNG plots as PREFIX_<plot>.png (latency and throughput vs "
                     "concurrency for sweeps, TTFT/ITL distributions)")


def scenario_params(ns: argparse.Namespace) -> dict[str, Any]:
    """Scenario fields from the flags given (None: not given) and --set pairs."""
    params: dict[str, Any] = {k: getattr(ns, k) for k in SCENARIO_FLAGS
                              if getattr(ns, k, None) is not None}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants FIELD=VALUE (got {item!r})")
        params[key.strip().replace("-", "_")] = value
    return params


def config_from_args(ns: argparse.Namespace):
    """A BenchConfig from parsed arguments (ValueError on inconsistent ones)."""
    from bench.runner import BenchConfig, parse_compare, parse_concurrency

    if ns.url and ns.compare:
        raise ValueError("--url and --compare exclude each other")
    if ns.url and ns.target == "vllm":
        raise ValueError("--target vllm starts vLLM's server itself; it excludes --url")
    if ns.rounds != 1 and ns.target != "vllm" and not ns.compare:
        raise ValueError("--rounds pairs runs: use it with --target vllm or --compare")
    if ns.compare and ns.target == "vllm":
        raise ValueError("--target vllm compares vLLM's server with one cluster (--up-args); "
                         "it excludes --compare")
    key, values = parse_compare(ns.compare) if ns.compare else (None, [])
    sweep = parse_concurrency(ns.concurrency or (
        str(OPEN_LOOP_CONCURRENCY) if ns.scenario in OPEN_LOOP else "8"))
    return BenchConfig(
        scenario=ns.scenario, scenario_params=scenario_params(ns), url=ns.url,
        redis_url=ns.redis_url, namespace=ns.namespace, compare_key=key, compare_values=values,
        up_args=shlex.split(ns.up_args), label=ns.label, baseline=ns.baseline, model=ns.model,
        api_key=ns.api_key, concurrency=sweep[0], concurrencies=sweep if len(sweep) > 1 else [],
        target=ns.target, rounds=ns.rounds, request_rate=ns.request_rate,
        max_seconds=ns.max_seconds, request_timeout_s=ns.request_timeout, warmup=ns.warmup,
        run_dir=Path(ns.run_dir) if ns.run_dir else None,
        cache_dir=Path(ns.cache_dir) if ns.cache_dir else None)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(ns: argparse.Namespace) -> int:
    """`splitserve bench`: 0 when every run was done, 1 when one could not be, 2 on bad
    arguments. Failed requests do not change the exit code; they are in the report."""
    from pydantic import ValidationError
    from rich.console import Console

    from bench.report import render, write_json, write_markdown
    from bench.runner import cluster_plan, run_bench
    from bench.workload import scenario_config

    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    err = Console(stderr=True, soft_wrap=True)
    try:
        cfg = config_from_args(ns)
        scenario_config(cfg.scenario, cfg.scenario_params)
        if not cfg.url:
            plan = cluster_plan(cfg)
            if cfg.compare_key and cfg.rounds > 1 and cfg.target != "vllm":
                from bench.gateway_rounds import check_gateway_only

                check_gateway_only(plan)
        known = [*cfg.compare_values, *(["vllm"] if cfg.target == "vllm" else [])]
        if cfg.baseline and cfg.compare_values and cfg.baseline not in known:
            raise ValueError(f"--baseline {cfg.baseline!r} is not a --compare value")
    except (ValueError, ValidationError) as exc:
        print(f"splitserve bench: {exc}", file=sys.stderr)
        return 2
    # SIGTERM stops like Ctrl-C: clusters this run started are stopped on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report, failure = run_bench(cfg, err)
    except KeyboardInterrupt:
        print("splitserve bench: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if ns.json_path:
        write_json(report, Path(ns.json_path))
    if ns.markdown_path and report.runs:
        write_markdown(report, Path(ns.markdown_path))
    if ns.plots_prefix and report.runs:
        from bench.plots import write_plots

        for path in write_plots(report, ns.plots_prefix):
            print(f"splitserve bench: wrote {path}", file=sys.stderr)
    if report.runs:
        render(report, Console())
    if failure:
        print(f"splitserve bench: {failure}", file=sys.stderr)
        return 1
    return 0
