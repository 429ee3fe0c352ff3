"""Writes docs/settings.md from the typed config models (`python scripts/gen_settings_doc.py`).

tests/unit/test_settings_doc_fresh.py fails when the committed file differs from what the
models generate, so the reference cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydantic import BaseModel  # noqa: E402

from router.redis_config import RedisClientConfig  # noqa: E402
from router.replica_config import IndexReplicaConfig, RegistryFeedConfig  # noqa: E402
from services.controller.config import ClusterConfig, PoolConfig  # noqa: E402
from services.gateway.config import GatewayConfig  # noqa: E402
from services.logs import LogConfig  # noqa: E402
from services.planner.config import (CapacityConfig, KubeConfig, PlannerConfig,  # noqa: E402
                                     PoolLimits, PrometheusQueries)
from services.tracing import TracingConfig  # noqa: E402
from services.worker.config import DEFAULT_ENGINE_ARGS, EngineConfig, WorkerConfig  # noqa: E402
from services.worker.engine_args import OWNED, SAME_IN_EVERY_POOL  # noqa: E402

MODELS: list[tuple[type[BaseModel], str]] = [
    (ClusterConfig, "A whole cluster, as `splitserve up` builds it from its flags."),
    (PoolConfig, "One pool of workers (`prefill`, `decode`, or aggregated `workers`)."),
    (EngineConfig, "The vLLM engine of every worker."),
    (WorkerConfig, "One worker (set by the controller; listed for reference)."),
    (GatewayConfig, "One gateway process (`splitserve gateway`)."),
    (IndexReplicaConfig, "The gateway's local replica of the prefix index (gateway "
     "`index_replica`; docs/routing.md)."),
    (RegistryFeedConfig, "How a gateway follows the registry's change log (gateway "
     "`registry_feed`; docs/routing.md)."),
    (PlannerConfig, "The SLA planner (`splitserve planner`, docs/planner.md)."),
    (PoolLimits, "Bounds of one pool (planner `prefill`, `decode`)."),
    (CapacityConfig, "The planner's capacity model figures (planner `capacity`)."),
    (PrometheusQueries, "PromQL of the planner's Prometheus source (planner "
     "`prometheus_queries`)."),
    (KubeConfig, "The planner on Kubernetes: RayCluster and Lease (planner `kube`)."),
    (LogConfig, "Logging of every process, from the environment: `SPLITSERVE_LOG_FORMAT`, "
     "`SPLITSERVE_LOG_LEVEL` (`--log-format` sets the first for everything `splitserve` "
     "starts)."),
    (RedisClientConfig, "Every Redis client (gateway, workers, controller, planner, CLI), from "
     "the environment: `SPLITSERVE_REDIS_<SETTING>`, e.g. `SPLITSERVE_REDIS_TIMEOUT_S=1` "
     "(`splitserve up` passes them on to its workers; docs/fault-tolerance.md)."),
    (TracingConfig, "OpenTelemetry tracing of every process, from the environment: "
     "`SPLITSERVE_TRACING_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, "
     "`OTEL_EXPORTER_OTLP_ENDPOINT`), `SPLITSERVE_TRACING_SAMPLE_RATIO`, "
     "`SPLITSERVE_TRACING_INSECURE`."),
]


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        name = getattr(field.default_factory, "__name__", "")
        return f"`{name}()`" if name and name != "<lambda>" else f"`{field.default_factory()!r}`"
    return f"`{field.default!r}`"


def _type(field) -> str:
    ann = field.annotation
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "").replace("pathlib.", "").replace("|", "\\|")


def render() -> str:
    out = ["# Settings reference", "",
           "Generated from the typed config models by `scripts/gen_settings_doc.py`; do not edit.",
           ""]
    for model, blurb in MODELS:
        out += [f"## {model.__name__}", "", blurb, "", "| setting | type | default | meaning |",
                "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            out.append(f"| `{name}` | {_type(field)} | {_default(field)} | "
                       f"{field.description or ''} |")
        out.append("")
    return "\n".join(out + CLUSTER_SECRET + ENGINE_ARGS_INTRO
                     + _engine_args_tables())


CLUSTER_SECRET = """## Cluster secret

What every internal caller proves to a worker (docs/security.md, "Internal authentication").
Not a field of any model above (models travel as JSON on command lines and through Ray), but
read from the environment by each process (services/cluster_secret.py), first match wins:

| variable | meaning |
|---|---|
| `SPLITSERVE_CLUSTER_SECRET` | the secret itself (at least 16 bytes; surrounding whitespace ignored) |
| `SPLITSERVE_CLUSTER_SECRET_FILE` | a file holding it (the Helm chart mounts its Secret there) |

`splitserve up` takes `--cluster-secret-file` (ClusterConfig.cluster_secret_file) before both,
and generates a secret when none is given; it writes the one it uses to
`<run_dir>/cluster-secret` (mode 0600), hands the gateway that file and its worker actors the
variable. `splitserve gateway` and every worker refuse to start without one (exit 2 / a failed
start), never serving unauthenticated.

""".splitlines()


ENGINE_ARGS_INTRO = """## Engine arguments

Every vLLM engine argument (`python -m vllm.entrypoints.openai.api_server --help` lists them) can
be set for every pool and per pool. They pass through to vLLM untouched: each value is parsed by
vLLM's own argument parser, in `splitserve up` before anything starts (a bad one: a message
naming it, exit 2) and again by the worker that hands it to its engine.

- Command line: `--engine-arg KEY=VALUE` (every pool), `--prefill-engine-arg KEY=VALUE`,
  `--decode-engine-arg KEY=VALUE`; repeatable; KEY is vLLM's name, with `_` or `-`; VALUE as
  on vLLM's command line (`true`/`false` for switches, JSON for dict-valued arguments such as
  `speculative_config`).
- `splitserve up --config FILE` (YAML): any `up` flag by its name, plus `engine_args` (every
  pool) and a section per pool, `prefill`, `decode` or `both` (aggregated), with `replicas`,
  `resources` and `engine_args`. Flags typed on the command line win over the file; a pool's
  map goes on top of the shared one.

  ```yaml
  mode: disaggregated
  engine_args:
    max_num_batched_tokens: 4096
  prefill:
    replicas: 2
    engine_args: {enable_chunked_prefill: true}
  decode:
    engine_args: {max_num_seqs: 128, speculative_config: {method: ngram, num_speculative_tokens: 3}}
  ```
- Helm: `engine.engineArgs` (every pool) and `rayCluster.workerGroups.<pool>.engineArgs`; the
  chart renders them into the controller's `--config` file (docs/kubernetes.md).
- The CLI flags `--kv-blocks` (vLLM's `num_gpu_blocks_override`) and the defaults below are
  engine arguments too; an explicit engine argument wins.
""".splitlines()


def _engine_args_tables() -> list[str]:
    out = ["", "Where splitserve starts from vLLM's own defaults:", "",
           "| argument | value |", "|---|---|"]
    out += [f"| `{k}` | `{v!r}` |" for k, v in DEFAULT_ENGINE_ARGS.items()]
    out += ["", "Refused anywhere: splitserve sets these itself, because prefill/decode "
            "correctness or the router depends on them:", "",
            "| argument | instead |", "|---|---|"]
    out += [f"| `{k}` | {why} |" for k, why in OWNED.items()]
    out += ["", "Allowed in the shared map only (every engine of a cluster must agree):", "",
            "| argument | why |", "|---|---|"]
    out += [f"| `{k}` | {why} |" for k, why in SAME_IN_EVERY_POOL.items()]
    out.append("")
    return out


def main() -> int:
    (REPO / "docs" / "settings.md").write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
