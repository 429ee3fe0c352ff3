"""`splitserve planner`: run the SLA planner against a cluster (docs/planner.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from router.registry import DEFAULT_NAMESPACE

log = logging.getLogger(__name__)

# flag dest -> dotted PlannerConfig field
_FLAGS: dict[str, str] = {
    "redis_url": "redis_url", "namespace": "namespace", "ttft_p90_ms": "ttft_p90_ms",
    "itl_p90_ms": "itl_p90_ms", "interval_s": "interval_s", "window_s": "window_s",
    "cooldown_up_s": "cooldown_up_s", "cooldown_down_s": "cooldown_down_s",
    "prefill_min": "prefill.min_replicas", "prefill_max": "prefill.max_replicas",
    "decode_min": "decode.min_replicas", "decode_max": "decode.max_replicas",
    "both_min": "both.min_replicas", "both_max": "both.max_replicas",
    "metrics_source": "metrics_source", "prometheus_url": "prometheus_url",
    "kubeconfig": "kube.kubeconfig", "kube_context": "kube.context",
    "kube_namespace": "kube.namespace", "raycluster": "kube.raycluster",
    "lease_name": "kube.lease_name", "identity": "kube.identity",
    "metrics_host": "metrics_host", "metrics_port": "metrics_port",
}


def add_planner_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `planner` subcommand on the `splitserve` parser."""
    p = subparsers.add_parser("planner", help="SLA autoscaler: sizes the prefill and decode pools "
                              "(or an aggregated cluster's pool) from TTFT/ITL targets "
                              "(docs/planner.md)")
    p.add_argument("--config", help="PlannerConfig as a JSON or YAML file (flags override it)")
    p.add_argument("--redis-url", help="the cluster's Redis (required here or in --config)")
    p.add_argument("--namespace", help=f"Redis key namespace (default {DEFAULT_NAMESPACE})")
    p.add_argument("--ttft-p90-ms", type=float, help="SLO: p90 time to first token")
    p.add_argument("--itl-p90-ms", type=float, help="SLO: p90 inter-token latency")
    p.add_argument("--interval-s", type=float, help="seconds between steps")
    p.add_argument("--window-s", type=float, help="metrics window")
    p.add_argument("--cooldown-up-s", type=float)
    p.add_argument("--cooldown-down-s", type=float)
    p.add_argument("--prefill-min", type=int)
    p.add_argument("--prefill-max", type=int)
    p.add_argument("--decode-min", type=int)
    p.add_argument("--decode-max", type=int)
    p.add_argument("--both-min", type=int, help="aggregated clusters: fewest workers of role both")
    p.add_argument("--both-max", type=int, help="aggregated clusters: most workers of role both")
    p.add_argument("--metrics-source", choices=["direct", "prometheus"])
    p.add_argument("--prometheus-url")
    p.add_argument("--kube", action="store_true", help="scale a RayCluster, elect a leader via a "
                   "Lease (in-cluster config unless --kubeconfig)")
    p.add_argument("--kubeconfig", help="kubeconfig file (implies --kube)")
    p.add_argument("--kube-context")
    p.add_argument("--kube-namespace", help="namespace of the RayCluster and the Lease")
    p.add_argument("--raycluster", help="RayCluster name")
    p.add_argument("--lease-name")
    p.add_argument("--identity", help="leader-election identity (default host-pid)")
    p.add_argument("--metrics-host", help="address of the planner's /metrics")
    p.add_argument("--metrics-port", type=int, help="port of the planner's /metrics (0: off)")
    p.add_argument("--once", action="store_true", help="one step, print its report, exit")
    p.set_defaults(func=run_planner_command)
    return p


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    d[last] = value


def config_from_args(ns: argparse.Namespace):  # -> PlannerConfig
    """PlannerConfig from --config and the flags; raises ValueError/ValidationError."""
    from services.planner.config import PlannerConfig

    data: dict[str, Any] = {}
    if ns.config:
        path = Path(ns.config)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read --config {path}: {exc.strerror}") from exc
        import yaml

        try:
            loaded = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ValueError(f"--config {path} is not valid {path.suffix[1:] or 'json'}: {exc}")
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path} must hold a mapping of settings")
        data = loaded
    for dest, dotted in _FLAGS.items():
        value = getattr(ns, dest, None)
        if value is not None:
            _set(data, dotted, value)
    if ns.kube or ns.kubeconfig:
        _set(data, "kube.enabled", True)
    return PlannerConfig.model_validate(data)


async def _main(cfg, once: bool) -> int:
    from router.redis_client import redis_client
    from services.planner.kube import LeaseElector, RayClusterScaler, api_client, default_identity
    from services.planner.planner import Planner
    from services.planner.telemetry import PlannerMetrics

    identity = cfg.kube.identity or default_identity()
    scaler = elector = None
    if cfg.kube.enabled:
        api = api_client(cfg.kube, user_agent=f"splitserve-planner/{identity}")
        scaler, elector = RayClusterScaler(api, cfg.kube), LeaseElector(api, cfg.kube, identity)
    redis = redis_client(cfg.redis_url)
    metrics = PlannerMetrics()
    server = None
    if cfg.metrics_port and not once:
        server, _ = metrics.serve(cfg.metrics_host, cfg.metrics_port)
        log.info("planner metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)
    planner = Planner(cfg, redis, scaler=scaler, elector=elector, metrics=metrics,
                      identity=identity)
    try:
        if once:
            report = await planner.step()
            await planner.aclose()
            print(json.dumps(asdict(report), indent=2, default=str))
            return 1 if report.errors else 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("planner %s running: %s, every %.0fs", identity,
                 "Kubernetes (RayCluster + Lease)" if cfg.kube.enabled else "alone, Redis only",
                 cfg.interval_s)
        await planner.run(stop)
        return 0
    finally:
        await redis.aclose()
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]


def run_planner_command(ns: argparse.Namespace) -> int:
    """Entry point of `splitserve planner`."""
    try:
        cfg = config_from_args(ns)
    except (ValueError, ValidationError) as exc:
        print(f"splitserve planner: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(cfg, ns.once))
    except Exception as exc:  # kube config missing, port taken, ...: a message, not a trace
        print(f"splitserve planner: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
