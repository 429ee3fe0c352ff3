"""The `splitserve` command: up, status, make-model, gateway, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING, Any

from router.registry import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from services.controller.config import ClusterConfig
    from services.worker.config import EngineConfig


class UpArgsError(ValueError):
    """`up` settings that cannot start a cluster (bad engine argument, bad config file)."""


def engine_args_maps(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The vLLM engine arguments `up`'s flags and config file give: (every pool's, {pool: its
    own}), checked and parsed by vLLM's parser for every pool of the cluster's mode, so that a
    bad one stops `up` before anything starts."""
    from services.worker.config import DEFAULT_ENGINE_ARGS
    from services.worker.engine_args import (EngineArgsError, check_overrides, merged, parse,
                                             parse_assignments)

    try:
        shared_given = {**getattr(ns, "file_engine_args", {}),
                        **parse_assignments(ns.engine_arg, "--engine-arg")}
        per_pool = {pool: dict(args) for pool, args in getattr(ns, "file_pool_engine_args",
                                                               {}).items()}
        for pool, flag in (("prefill", ns.prefill_engine_arg), ("decode", ns.decode_engine_arg)):
            if flag:
                per_pool.setdefault(pool, {}).update(
                    parse_assignments(flag, f"--{pool}-engine-arg"))
        check_overrides(shared_given, per_pool)
        shared = dict(DEFAULT_ENGINE_ARGS)
        if ns.kv_blocks is not None:  # --kv-blocks is vLLM's num_gpu_blocks_override
            shared["num_gpu_blocks_override"] = ns.kv_blocks
        shared.update(merged(shared_given, {}))
        pools = ("both",) if ns.mode == "aggregated" else ("prefill", "decode")
        if unused := sorted(set(per_pool) - set(pools)):
            raise EngineArgsError(f"engine arguments for the {', '.join(unused)} pool, which a "
                                  f"{ns.mode} cluster does not have")
        parse(shared, "engine arguments of every pool")
        for pool in pools:
            if per_pool.get(pool):
                parse(merged(shared, per_pool[pool]), f"{pool} engine arguments")
    except EngineArgsError as exc:
        raise UpArgsError(str(exc)) from None
    return shared, per_pool


def frontend_args_map(ns: argparse.Namespace) -> dict[str, Any]:
    """`--frontend-arg KEY=VALUE`s, checked by vLLM's own server parser."""
    from services.worker.engine_args import EngineArgsError, parse, parse_assignments, server_parser

    try:
        args = parse_assignments(ns.frontend_arg, "--frontend-arg")
        parse(args, "--frontend-arg", parser=server_parser())
    except EngineArgsError as exc:
        raise UpArgsError(str(exc)) from None
    return args


def gateway_replicas(ns: argparse.Namespace) -> dict[str, Any]:
    """The gateway's local replicas (`--index-replica`, `--registry-feed`) as its settings."""
    from router.replica_config import IndexReplicaConfig, RegistryFeedConfig

    return {"index_replica": IndexReplicaConfig() if ns.index_replica else None,
            "registry_feed": RegistryFeedConfig() if ns.registry_feed else None}


def engine_config(ns: argparse.Namespace, cache_dir: Path,
                  shared: dict[str, Any] | None = None) -> "EngineConfig":
    """The engine settings `splitserve up` gives its workers, from its parsed flags (the
    built-in model, made on first use, when no --model is given). Raises UpArgsError."""
    from services.controller.builtin_model import ensure_builtin_model
    from services.worker.config import EngineConfig

    if shared is None:
        shared, _ = engine_args_maps(ns)
    model, served = ns.model, ns.served_model_name
    if model is None:
        model = str(ensure_builtin_model(cache_dir, "tiny"))
        served = served or "splitserve-tiny"
    device = ns.device or _detect_device()
    return EngineConfig(model=model, served_model_name=served, device=device,
                        max_model_len=ns.max_model_len, block_size=ns.block_size,
                        dtype=ns.dtype or ("float32" if device == "cpu" else "auto"),
                        cpu_kv_cache_space_gib=ns.kv_cache_gib,
                        tensor_parallel_size=ns.tensor_parallel_size,
                        pipeline_parallel_size=ns.pipeline_parallel_size,
                        kv_lease_duration_s=ns.kv_lease_s, engine_args=shared,
                        nixl_ordered_descriptors=ns.kv_descriptor_order == "local")


def _up(ns: argparse.Namespace) -> int:
    from services.controller.cluster import run_up

    try:
        cfg = cluster_config(ns)
    except UpArgsError as exc:
        print(f"splitserve up: {exc}", file=sys.stderr)
        return 2
    return run_up(cfg)


def cluster_config(ns: argparse.Namespace) -> "ClusterConfig":
    """The cluster `splitserve up` starts, from its parsed flags. Raises UpArgsError."""
    from services.controller.config import ClusterConfig, PoolConfig, default_cache_dir
    from services.gateway.config import MigrationConfig
    from router.policies import KVPolicyConfig

    cache_dir = Path(ns.cache_dir) if ns.cache_dir else default_cache_dir()
    shared, pool_args = engine_args_maps(ns)
    engine = engine_config(ns, cache_dir, shared)
    frontend_args = frontend_args_map(ns)
    device = engine.device
    # one engine spans tensor x pipeline parallel GPUs
    gpus = float(ns.tensor_parallel_size * ns.pipeline_parallel_size) if device == "cuda" else 0.0
    cpus = 1.0 if device == "cpu" else 0.0
    cfg = ClusterConfig(
        mode=ns.mode, engine=engine, host=ns.host, port=ns.port, grpc_port=ns.grpc_port,
        max_in_flight=ns.max_in_flight, max_in_flight_per_client=ns.max_in_flight_per_client,
        max_body_bytes=ns.max_body_bytes,
        api_keys_file=Path(ns.api_keys_file).resolve() if ns.api_keys_file else None,
        tenant_isolation=ns.tenant_isolation, slow_client_timeout_s=ns.slow_client_timeout,
        route_headers=ns.route_headers, **gateway_replicas(ns),
        cluster_secret_file=(Path(ns.cluster_secret_file).resolve()
                             if ns.cluster_secret_file else None),
        prefill=PoolConfig(replicas=ns.prefill, num_cpus=cpus, num_gpus=gpus,
                           resources=ns.prefill_resources, placement_group=ns.placement_group,
                           engine_args=pool_args.get("prefill", {})),
        decode=PoolConfig(replicas=ns.decode, num_cpus=cpus, num_gpus=gpus,
                          resources=ns.decode_resources, placement_group=ns.placement_group,
                          engine_args=pool_args.get("decode", {})),
        workers=PoolConfig(replicas=ns.workers, num_cpus=cpus, num_gpus=gpus,
                           resources=ns.workers_resources, placement_group=ns.placement_group,
                           engine_args=pool_args.get("both", {})),
        worker_host=ns.worker_host, worker_metrics_port=ns.worker_metrics_port,
        gateway=not ns.no_gateway, keep_workers_on_stop=ns.keep_workers_on_stop,
        redis_url=ns.redis_url, ray_address=ns.ray_address, namespace=ns.namespace,
        run_dir=Path(ns.run_dir) if ns.run_dir else None, cache_dir=cache_dir,
        policy=ns.policy, kv_policy=KVPolicyConfig(
            load_weight=ns.kv_load_weight, local_prefill_tokens=ns.kv_local_prefill_tokens,
            temperature=ns.kv_temperature,
            **({"scorer_weights": ns.kv_scorer_weights} if ns.kv_scorer_weights else {})),
        migration=MigrationConfig(prefill_timeout_s=ns.prefill_timeout_s),
        frontend_args=frontend_args)
    return cfg


def _up_file_tokens(up: argparse.ArgumentParser, flags: dict[str, Any]) -> list[str]:
    """A config file's `up` settings as command-line tokens, so that vLLM-independent flags
    are checked (types, choices) exactly as when typed, and typed flags after them win."""
    by_dest = {a.dest: a for a in up._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in flags.items():
        action = by_dest[key]
        option = action.option_strings[0]
        if action.nargs == 0:  # store_true, or --x/--no-x
            if value is True:
                tokens.append(option)
            elif value is False and isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(action.option_strings[1])
            elif value is not False:
                raise UpArgsError(f"--config: `{key}` takes true or false, not {value!r}")
        elif isinstance(value, (dict, list)):
            tokens += [option, json.dumps(value)]
        elif action.option_strings and value is not None:
            tokens += [option, str(value)]
    return tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `up --config FILE`'s settings under the flags typed."""
    from services.controller import up_file

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    if ns.command != "up" or not ns.config:
        return ns
    up = _subparser(parser, "up")
    try:
        found = up_file.load(Path(ns.config), {a.dest for a in up._actions if a.option_strings})
        tokens = _up_file_tokens(up, found.flags)
    except (up_file.UpFileError, UpArgsError) as exc:
        parser.exit(2, f"splitserve up: --config: {exc}\n")
    at = argv.index("up") + 1
    ns = parser.parse_args(argv[:at] + tokens + argv[at:])
    ns.file_engine_args = found.engine_args
    ns.file_pool_engine_args = found.pool_engine_args
    return ns


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _scorer_weights(text: str) -> dict[str, float]:
    """argparse type: `name=weight` pairs, comma separated."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"want NAME=WEIGHT pairs, got {item!r}")
    if not out:
        raise argparse.ArgumentTypeError("no scorer named")
    return out


def _resources(text: str) -> dict[str, float]:
    """argparse type: a JSON object of Ray resource name -> amount."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v >= 0 for k, v in value.items()):
        raise argparse.ArgumentTypeError('expected an object of name -> amount, e.g. {"prefill": 1}')
    return {k: float(v) for k, v in value.items()}


def _detect_device() -> str:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=10)
            return "cuda"
        except (subprocess.SubprocessError, OSError):
            pass
    return "cpu"


def _cluster_redis_url(ns: argparse.Namespace, command: str) -> str | None:
    """--redis-url, else the Redis of the cluster `splitserve up` runs on this machine (from
    its state file); None, with a message, when there is none."""
    if ns.redis_url:
        return ns.redis_url
    from services.controller.state_file import NoCluster, find_cluster

    try:
        return find_cluster(ns.namespace).redis_url
    except NoCluster as exc:
        print(f"splitserve {command}: {exc}", file=sys.stderr)
        return None


def _status(ns: argparse.Namespace) -> int:
    from router.redis_client import RedisClientConfig, redis_client
    from router.registry import WorkerRegistry

    url = _cluster_redis_url(ns, "status")
    if url is None:
        return 2

    async def read() -> list:
        redis = redis_client(url, RedisClientConfig().for_tools())
        try:
            return await WorkerRegistry(redis, ns.namespace).live_workers()
        finally:
            await redis.aclose()

    try:
        workers = asyncio.run(read())
    except Exception as exc:
        print(f"splitserve status: cannot read the registry at {url}: {exc}",
              file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps([w.model_dump(mode="json") for w in workers], indent=2))
        return 0
    if not workers:
        print("no live workers")
        return 0
    if not sys.stdout.isatty():
        for w in workers:
            print(f"{w.worker_id}\t{w.role.value}\t{w.address}\t{w.model}\t"
                  f"in_flight={w.load.in_flight}\trunning={w.load.num_running_reqs}\t"
                  f"waiting={w.load.num_waiting_reqs}\tkv_usage={w.load.kv_cache_usage:.2f}\t"
                  f"{w.metrics_url}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("worker", "role", "address", "model", "in flight", "running", "waiting",
                  "kv usage", "metrics")
    for w in workers:
        table.add_row(w.worker_id, w.role.value, w.address, w.model, str(w.load.in_flight),
                      str(w.load.num_running_reqs), str(w.load.num_waiting_reqs),
                      f"{w.load.kv_cache_usage:.0%}", w.metrics_url)
    Console().print(table)
    return 0


def _scale(ns: argparse.Namespace) -> int:
    """Set desired pool sizes in Redis; with --wait, until the controller reaches them."""
    import time

    from router.redis_client import RedisClientConfig, redis_client
    from services.controller.pool_sizes import PoolSizes

    wanted = {pool: n for pool, n in (("prefill", ns.prefill), ("decode", ns.decode),
                                      ("both", ns.workers)) if n is not None}
    if not wanted:
        print("splitserve scale: give at least one of --prefill, --decode, --workers",
              file=sys.stderr)
        return 2
    for pool, n in wanted.items():
        try:
            PoolSizes.check(pool, n)
        except ValueError as exc:
            print(f"splitserve scale: {exc}", file=sys.stderr)
            return 2
    url = _cluster_redis_url(ns, "scale")
    if url is None:
        return 2

    async def run() -> int:
        redis = redis_client(url, RedisClientConfig().for_tools())
        try:
            sizes = PoolSizes(redis, ns.namespace)
            observed, updated_at = await sizes.observed()
            if not updated_at or time.time() - updated_at > 30:
                print(f"splitserve scale: no controller is running for namespace "
                      f"{ns.namespace!r} at {url}", file=sys.stderr)
                return 2
            unknown = [p for p in wanted if p not in observed]
            if unknown:
                print(f"splitserve scale: this cluster has no {', '.join(unknown)} pool "
                      f"(its pools: {', '.join(observed)})", file=sys.stderr)
                return 2
            await sizes.set_desired(wanted, by="cli")
            print("desired: " + " ".join(f"{p}={n}" for p, n in wanted.items()), flush=True)
            if ns.wait <= 0:
                return 0
            deadline = time.monotonic() + ns.wait
            while time.monotonic() < deadline:
                observed, _ = await sizes.observed()
                if all(observed[p].serving == n and not observed[p].starting
                       and not observed[p].draining for p, n in wanted.items()):
                    print("reached: " + " ".join(f"{p}={observed[p].serving}"
                                                 for p in wanted), flush=True)
                    return 0
                await asyncio.sleep(0.5)
            print("splitserve scale: pools did not reach their sizes in time: " + " ".join(
                f"{p}={observed[p].serving}(+{observed[p].starting} starting, "
                f"{observed[p].draining} draining)" for p in wanted), file=sys.stderr)
            return 1
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except Exception as exc:
        print(f"splitserve scale: cannot reach Redis at {url}: {exc}", file=sys.stderr)
        return 2


def _make_model(ns: argparse.Namespace) -> int:
    from services.controller.builtin_model import make_model

    try:
        path = make_model(Path(ns.dir), ns.size, overwrite=ns.overwrite)
    except (FileExistsError, ValueError) as exc:
        print(f"splitserve make-model: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _gateway(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from services.gateway.config import GatewayConfig

    try:
        if ns.config_json:
            text = sys.stdin.read() if ns.config_json == "-" else ns.config_json
            cfg = GatewayConfig.model_validate_json(text)
        else:
            try:
                frontend_args = frontend_args_map(ns)
            except UpArgsError as exc:
                print(f"splitserve gateway: {exc}", file=sys.stderr)
                return 2
            cfg = GatewayConfig(model=ns.model, frontend_args=frontend_args,
                                served_model_name=ns.served_model_name,
                                redis_url=ns.redis_url, namespace=ns.namespace, host=ns.host,
                                port=ns.port, metrics_port=ns.metrics_port, policy=ns.policy,
                                max_model_len=ns.max_model_len,
                                max_in_flight_per_client=ns.max_in_flight_per_client,
                                max_body_bytes=ns.max_body_bytes,
                                api_keys_file=ns.api_keys_file,
                                tenant_isolation=ns.tenant_isolation,
                                slow_client_timeout_s=ns.slow_client_timeout,
                                route_headers=ns.route_headers, **gateway_replicas(ns))
    except ValidationError as exc:
        print(f"splitserve gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    from services.cluster_secret import ClusterSecret, ClusterSecretError

    try:
        ClusterSecret.required("splitserve gateway")
    except ClusterSecretError as exc:
        print(f"splitserve gateway: {exc}", file=sys.stderr)
        return 2
    from services.gateway import vllm_frontend

    vllm_frontend.serve(cfg)
    return 0


def _bench(ns: argparse.Namespace) -> int:
    from bench.cli import run

    return run(ns)


def _add_gateway_guard_flags(p: argparse.ArgumentParser) -> None:
    """The gateway's input limits and API keys (docs/operations.md, "Input limits")."""
    p.add_argument("--max-in-flight-per-client", type=int, default=0,
                   help="gateway: generation requests one client (API key, else address) may "
                   "have in flight; 0: no per-client limit")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="gateway: largest request body (HTTP 413 beyond) and gRPC message")
    p.add_argument("--api-keys-file", help="gateway: accepted API keys, one per line (also "
                   "$SPLITSERVE_API_KEYS); /v1 and gRPC then need `Bearer <key>`")
    p.add_argument("--tenant-isolation", action="store_true",
                   help="gateway: a prefix cache per API-key tenant (needs API keys)")
    p.add_argument("--slow-client-timeout", type=float, default=30.0,
                   help="gateway: seconds a stream's client may take no data before the "
                   "response is cut and the request aborted (0: never)")
    p.add_argument("--route-headers", action="store_true",
                   help="gateway: answer with x-splitserve-* route headers (which workers, why)")
    p.add_argument("--index-replica", action=argparse.BooleanOptionalAction, default=True,
                   help="gateway: keep a local replica of the prefix index, followed from Redis, "
                   "and route from it (no Redis round trip per request; about 100 bytes of "
                   "gateway memory per cached (block, worker) pair; docs/routing.md)")
    p.add_argument("--registry-feed", action=argparse.BooleanOptionalAction, default=True,
                   help="gateway: follow the worker registry's change log instead of re-reading "
                   "every worker's entry twice a second (docs/routing.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a cluster (Redis, Ray, workers, gateway) and serve")
    up.add_argument("--mode", choices=["disaggregated", "aggregated"], default="disaggregated")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    up.add_argument("--decode", type=int, default=1, help="decode workers (disaggregated)")
    up.add_argument("--workers", type=int, default=1, help="workers (aggregated)")
    up.add_argument("--model", help="HF model directory or hub id (default: built-in tiny)")
    up.add_argument("--served-model-name", help="model name clients use")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=8000, help="gateway HTTP port (0: free port)")
    up.add_argument("--grpc-port", type=int, default=50051,
                    help="gateway public gRPC port (0: off, -1: a free port; docs/grpc.md)")
    up.add_argument("--max-in-flight", type=int, default=1024,
                    help="gateway admission limit: generation requests served at once")
    _add_gateway_guard_flags(up)
    up.add_argument("--policy", default="kv",
                    choices=["kv", "round_robin", "random", "least_loaded"], help="routing policy")
    up.add_argument("--kv-load-weight", type=float, default=0.25,
                    help="kv policy: price of a request ahead whose size is unknown (workers that "
                    "have not measured their speed yet), as a fraction of the prompt's prefill")
    up.add_argument("--kv-local-prefill-tokens", type=int, default=64,
                    help="kv policy: decode prefills locally up to this uncached remainder")
    up.add_argument("--kv-temperature", type=float, default=0.0,
                    help="kv policy: 0 picks the cheapest worker, >0 samples softmax(-cost/T)")
    up.add_argument("--kv-scorer-weights", type=_scorer_weights, metavar="NAME=W,...",
                    help="kv policy: the scorers and their weights, e.g. ttft=1,shared_step=1 "
                    "(scorers not named are off; default: docs/routing.md)")
    up.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    up.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    up.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Redis key namespace")
    up.add_argument("--run-dir", help="logs, sockets, temp files (default: a new tmp dir)")
    up.add_argument("--cache-dir", help="built-in models, compiled kernels")
    up.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if a GPU is seen")
    up.add_argument("--dtype", help="default: float32 on CPU, the model's on GPU")
    up.add_argument("--max-model-len", type=int, default=2048)
    up.add_argument("--block-size", type=int, default=32, help="KV block size (CPU: x32)")
    up.add_argument("--kv-cache-gib", type=int, default=1, help="CPU: KV cache GiB per engine")
    up.add_argument("--kv-blocks", type=int, help="KV cache blocks per engine, overriding "
                    "the memory settings (a small cache: eviction and block reuse sooner; "
                    "vLLM's num_gpu_blocks_override)")
    up.add_argument("--tensor-parallel-size", type=int, default=1)
    up.add_argument("--pipeline-parallel-size", type=int, default=1)
    up.add_argument("--kv-lease-s", type=int, default=30,
                    help="prefill workers hold unread KV blocks this long")
    up.add_argument("--kv-descriptor-order", choices=["local", "engine"], default="local",
                    help="KV reads list block pairs by local block so NIXL merges neighbours "
                    "(local), or in vLLM's own order (engine)")
    up.add_argument("--prefill-resources", type=_resources, default={},
                    help='custom Ray resources per prefill worker, JSON, e.g. \'{"prefill": 1}\'')
    up.add_argument("--decode-resources", type=_resources, default={},
                    help="custom Ray resources per decode worker, JSON")
    up.add_argument("--workers-resources", type=_resources, default={},
                    help="custom Ray resources per aggregated worker, JSON")
    up.add_argument("--placement-group", choices=["auto", "always", "never"], default="auto",
                    help="reserve each worker's resources as a placement group (auto: workers "
                    "of more than one GPU)")
    up.add_argument("--worker-host",
                    help="address workers bind and advertise; 'auto': each worker's node IP "
                    "(default: 127.0.0.1 with a local Ray, auto with --ray-address)")
    up.add_argument("--worker-metrics-port", type=int, default=0,
                    help="Prometheus port of every worker (0: a free one)")
    up.add_argument("--cluster-secret-file", help="file holding the cluster secret that "
                    "gateways and controllers prove to workers (default: "
                    "$SPLITSERVE_CLUSTER_SECRET, $SPLITSERVE_CLUSTER_SECRET_FILE, else a new "
                    "one in run_dir/cluster-secret; docs/security.md)")
    up.add_argument("--no-gateway", action="store_true",
                    help="do not run a gateway (gateways deployed on their own)")
    up.add_argument("--keep-workers-on-stop", action="store_true",
                    help="with --ray-address: stopping leaves the workers serving, with their "
                    "desired sizes, for the next `up` of the namespace to adopt")
    up.add_argument("--frontend-arg", action="append", metavar="KEY=VALUE", help="gateway: "
                    "a vLLM server setting by vLLM's name (tool_call_parser="
                    "hermes, enable_auto_tool_choice=true, chat_template=FILE, ...); repeatable")
    up.add_argument("--prefill-timeout-s", type=float, default=120.0,
                    help="gateway: a slower prefill is abandoned, decode computes the prompt")
    up.add_argument("--config", metavar="FILE", help="YAML file of these settings plus vLLM "
                    "engine arguments shared and per pool (docs/settings.md, \"Engine "
                    "arguments\"); flags typed here win over the file")
    up.add_argument("--engine-arg", action="append", metavar="KEY=VALUE", help="a vLLM engine "
                    "argument for every pool, by vLLM's name (e.g. max_num_batched_tokens=4096); "
                    "repeatable; checked by vLLM's own parser before anything starts")
    up.add_argument("--prefill-engine-arg", action="append", metavar="KEY=VALUE",
                    help="a vLLM engine argument for the prefill pool only; repeatable")
    up.add_argument("--decode-engine-arg", action="append", metavar="KEY=VALUE",
                    help="a vLLM engine argument for the decode pool only; repeatable")
    _add_log_format_flag(up)
    up.set_defaults(func=_up)

    st = sub.add_parser("status", help="list the live workers from the registry")
    st.add_argument("--redis-url", help="the cluster's Redis (default: that of the cluster "
                    "`splitserve up` runs on this machine, from its state file)")
    st.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    sc = sub.add_parser("scale", help="change the desired size of a running cluster's pools")
    sc.add_argument("--prefill", type=int, help="prefill workers wanted")
    sc.add_argument("--decode", type=int, help="decode workers wanted")
    sc.add_argument("--workers", type=int, help="workers wanted (aggregated clusters)")
    sc.add_argument("--redis-url", help="the cluster's Redis (default: that of the cluster "
                    "`splitserve up` runs on this machine, from its state file)")
    sc.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    sc.add_argument("--wait", type=float, default=0.0,
                    help="seconds to wait until the pools have these sizes (0: don't wait)")
    sc.set_defaults(func=_scale)

    mm = sub.add_parser("make-model", help="create the built-in model (offline, deterministic)")
    mm.add_argument("dir", help="output directory")
    mm.add_argument("--size", choices=["tiny", "small"], default="tiny")
    mm.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    mm.set_defaults(func=_make_model)

    gw = sub.add_parser("gateway", help="run a gateway process against a running cluster")
    gw.add_argument("--config-json", help="full GatewayConfig as JSON (overrides flags); "
                    "-: read it from stdin")
    gw.add_argument("--model", help="model directory (tokenizer, chat template)")
    gw.add_argument("--served-model-name")
    gw.add_argument("--redis-url")
    gw.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--metrics-port", type=int, default=0,
                    help="serve /metrics on this port only, plain HTTP (the HTTP port then "
                    "answers it with 404); 0: on the HTTP port")
    gw.add_argument("--policy", default="kv",
                    choices=["kv", "round_robin", "random", "least_loaded"])
    gw.add_argument("--max-model-len", type=int, default=2048)
    gw.add_argument("--frontend-arg", action="append", metavar="KEY=VALUE", help="a vLLM "
                    "server setting by vLLM's name (tool_call_parser=hermes, ...); repeatable")
    _add_gateway_guard_flags(gw)
    _add_log_format_flag(gw)
    gw.set_defaults(func=_gateway)

    from bench.cli import add_arguments as add_bench_arguments

    bn = sub.add_parser("bench", help="load generator: TTFT, ITL, throughput, prefix hit rate; "
                        "against --url or clusters it starts (--compare KEY=V1,V2)")
    add_bench_arguments(bn)
    bn.set_defaults(func=_bench)
    from services.planner.cli import add_planner_parser
    add_planner_parser(sub)
    return parser


def _add_log_format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="log format of this process and every process it starts "
                        "(default: $SPLITSERVE_LOG_FORMAT or text; docs/operations.md)")


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from services.logs import LogConfig, configure_logging
    from services.tracing import TracingConfig

    ns = parse_args(argv)
    if getattr(ns, "log_format", None):
        os.environ["SPLITSERVE_LOG_FORMAT"] = ns.log_format  # inherited by what it starts
    try:
        log_cfg = LogConfig()
        TracingConfig()  # read again by each process; fail here, before anything starts
    except ValidationError as exc:
        print(f"splitserve: invalid logging or tracing setting in the environment:\n{exc}",
              file=sys.stderr)
        return 2
    configure_logging(log_cfg, component="controller" if ns.command == "up" else ns.command)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
