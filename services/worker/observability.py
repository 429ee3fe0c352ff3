"""A worker process's logs, traces and metrics, set up once before its engine starts."""

from __future__ import annotations

import os

from services import tracing
from services.logs import LogConfig, configure_logging, vllm_environment
from services.tracing import TracingConfig
from services.worker.config import WorkerConfig
from services.worker.metrics import WorkerMetrics


def setup_observability(cfg: WorkerConfig) -> WorkerMetrics:
    """Configure this process's logging (and vLLM's, in this process and the engine-core process
    it spawns) from LogConfig, tracing from TracingConfig, and create the worker's metrics."""
    log_cfg = LogConfig()
    fields = {"component": "worker", "worker_id": cfg.worker_id, "role": cfg.role.value}
    configure_logging(log_cfg, **fields)
    os.environ.update(vllm_environment(log_cfg, cfg.run_dir / f"logging-{cfg.worker_id}.json",
                                       **fields))
    tracing.setup(TracingConfig(), "splitserve-worker", **{"splitserve.worker_id": cfg.worker_id,
                                                           "splitserve.role": cfg.role.value})
    return WorkerMetrics(cfg.worker_id, cfg.role.value, cfg.engine.name)
