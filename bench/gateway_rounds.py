"""Paired rounds of gateway settings on one cluster: `splitserve bench --compare policy=kv,
round_robin,least_loaded --rounds N`.

A routing policy (or any other setting that only the gateway reads) is compared on the same
workers, the same cores and the same engines: the cluster is started once, with the first
value; a gateway of its own is started beside it for every other value (the cluster's own
gateway settings with that value, on a free port). Every round sends one fresh workload
(seed + step) to each gateway in turn, the order rotating from round to round, so drift in
the machine's speed falls on every side alike.

The sides share the engines, so each run sends its requests with a `cache_salt` of its own
(vLLM mixes it into the hash of a prompt's first block, and the router hashes with it): no run
finds another run's prompts in the prefix cache, and every run starts cold, as on a cluster of
its own. What one run left in the caches only takes room (evicted first: it is never used
again).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from bench.report import RunReport
from bench.workload import Workload

# The ClusterConfig parts that make the workers: values of a rounds comparison must agree on
# them (anything else is the gateway's).
WORKER_FIELDS = ("mode", "engine", "prefill", "decode", "workers", "worker_host",
                 "namespace", "ray_address", "redis_url")


def _cluster_config(up_args: list[str]) -> Any:
    from services.cli import cluster_config, parse_args

    return cluster_config(parse_args(["up", *up_args]))


def check_gateway_only(plan: list[tuple[str, list[str], dict[str, Any]]]) -> None:
    """ValueError unless every value of the comparison starts the same workers."""
    first = None
    for label, args, _ in plan:
        cc = _cluster_config(args)
        workers = cc.model_dump(include=set(WORKER_FIELDS))
        if first is None:
            first = (label, workers)
        elif workers != first[1]:
            changed = sorted(k for k in WORKER_FIELDS if workers[k] != first[1][k])
            raise ValueError(
                f"--rounds with --compare runs every value on one cluster, so the values may "
                f"only change the gateway; {label!r} changes {', '.join(changed)} (compare "
                "worker settings without --rounds: a cluster each)")


def rotated(sides: list[Any], step: int) -> list[Any]:
    """The order of the sides in round `step`: rotated by one every round."""
    k = step % len(sides)
    return sides[k:] + sides[:k]


def run_gateway_rounds(cfg: Any, plan: list[tuple[str, list[str], dict[str, Any]]],
                       root: Path, cache_dir: Path, workload: Workload,
                       base: dict[str, Any], runs: list[RunReport], err: Console,
                       namespace: str) -> str | None:
    """Start the cluster of `plan[0]` and a gateway for every other value, run the paired
    rounds into `runs`; why it failed, or None."""
    from bench.engine_metrics import registry_endpoints
    from bench.runner import measure, stop_starting_cluster, workload_config, workload_for_step
    from services.cluster_secret import FILE_NAME
    from services.controller.cluster import gateway_config
    from services.controller.gateway_process import GatewayProcess
    from services.controller.launcher import start_cluster
    from services.ports import free_port

    label0, args0, extra0 = plan[0]
    err.print(f"[bold]{escape(label0)}[/bold]: starting `splitserve up {escape(' '.join(args0))}`"
              f" (logs: {root / 'c0.out'}); the other values get gateways of their own on it")
    try:
        cluster = start_cluster(args0, root / "c0", cache_dir, cfg.cluster_timeout_s)
    except KeyboardInterrupt:
        stop_starting_cluster(root / "c0")
        raise
    except (RuntimeError, TimeoutError) as exc:
        return f"{label0}: the cluster did not start: {str(exc)[-2000:]}"
    gateways: list[GatewayProcess] = []
    try:
        engines = registry_endpoints(cluster.redis_url, namespace)
        registry = (cluster.redis_url, namespace)
        sides = [(label0, cluster.http, {**base, **extra0, "target": "cluster",
                                         "up_args": args0})]
        for i, (label, args, extra) in enumerate(plan[1:], start=1):
            gcfg = gateway_config(_cluster_config(args), cluster.redis_url,
                                  free_port("127.0.0.1"), 0)
            run_dir = root / f"g{i}"
            run_dir.mkdir(parents=True, exist_ok=True)
            gw = GatewayProcess(gcfg, run_dir, cluster.run_dir / FILE_NAME)
            gateways.append(gw)
            err.print(f"[bold]{escape(label)}[/bold]: starting a gateway on the same cluster "
                      f"(logs: {run_dir / 'gateway.log'})")
            gw.start()
            gw.wait_ready(timeout_s=180)
            sides.append((label, gw.url, {**base, **extra, "target": "cluster-gateway",
                                          "up_args": args}))
        sweep = cfg.sweep
        done: list[RunReport] = []
        order = {label: i for i, (label, _, _) in enumerate(plan)}
        for i, c in enumerate(sweep):
            for k in range(cfg.rounds):
                step = i * cfg.rounds + k  # every step and round sends prompts of its own
                wl = workload if step == 0 else workload_for_step(cfg, step)
                for pos, (name, url, config) in enumerate(rotated(sides, step)):
                    cfg_i = config if step == 0 else {**config, **workload_config(wl, cfg)}
                    run_label = (name if len(sweep) == 1 else f"{name}@c{c}") + f"#{k + 1}"
                    try:
                        report = asyncio.run(measure(
                            run_label, url, engines, wl, cfg,
                            {**cfg_i, "order_in_step": pos}, err, c, name,
                            cluster.proc.pid, registry, cache_salt=f"{name}:{step}"))
                    except Exception as exc:
                        return f"{name}: the run failed: {type(exc).__name__}: {exc}"
                    report.round = k + 1
                    done.append(report)
                    runs[:] = sorted(done, key=lambda r: (order[r.target],
                                                          sweep.index(r.concurrency or 0),
                                                          r.round or 0))
        return None
    finally:
        for gw in gateways:
            gw.stop()
        code = cluster.stop()
        if code != 0:
            err.print(f"[yellow]{escape(label0)}: splitserve up exited {code}[/yellow]")
