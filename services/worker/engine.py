"""The vLLM engine a worker owns: its arguments, its start and stop, and the figures it
reports (load for the registry, speed for the router's cost model, vLLM's metrics).

One `AsyncLLM` per worker, which owns the engine-core process and vLLM's statistics loggers;
gateways' requests reach its engine core over the engine link (services/worker/link_server.py).
Its role decides the KV connector: `prefill` is a NIXL KV producer
(computes a prompt and holds its blocks for a decode worker to pull), `decode` a NIXL KV
consumer (pulls those blocks instead of computing them), `both` has no connector. Prefix caching
and the engine's KV-cache event publisher (ZMQ) are on in every role.

vLLM is imported lazily, after the worker has set the engine's environment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.registry import WorkerLoad, WorkerRole
from services.worker.config import (NIXL_ORDERED_DESCRIPTORS_KEY, NIXL_PROGRESS_THREAD_KEY,
                                    WorkerConfig)
from services.worker.engine_args import parse as parse_engine_args
from services.worker.engine_speed import EngineSpeed
from services.stat_logger import stat_logger
from services.worker.link_stats import merged

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv"


@dataclass
class EngineCounters:
    """Cumulative figures since start, plus the scheduler's latest snapshot."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    last_step_at: float = 0.0
    requests_total: int = 0
    requests_aborted: int = 0
    lease_expired: int = 0


class EngineHost:
    """Owns one AsyncLLM and exposes what the worker API needs."""

    def __init__(self, cfg: WorkerConfig, kv_events_endpoint: str,
                 kv_events_replay_endpoint: str | None = None) -> None:
        self.cfg = cfg
        self.kv_events_endpoint = kv_events_endpoint
        self.kv_events_replay_endpoint = kv_events_replay_endpoint
        self.counters = EngineCounters()
        #: prefill speed, step time and waiting prompt work, for the router's cost model
        self.speed = EngineSpeed()
        self.metrics: WorkerMetrics | None = None  # set by the worker process
        self.link: Any = None  # the worker's LinkServer, set by the worker process
        self._link_step: Any = None  # the link requests' statistics of the current step
        self._engine: AsyncLLM | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def engine_args(self) -> Any:
        """The vLLM engine arguments for this worker's config and role."""
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        eng = self.cfg.engine
        kv_transfer = None
        if self.cfg.role != WorkerRole.BOTH:
            kv_transfer = KVTransferConfig(
                kv_connector="SplitserveNixlConnector",
                kv_connector_module_path="services.worker.nixl_connector",
                kv_role="kv_producer" if self.cfg.role == WorkerRole.PREFILL else "kv_consumer",
                kv_buffer_device="cpu" if eng.device == "cpu" else "cuda",
                engine_id=self.cfg.worker_id,
                kv_connector_extra_config={
                    "num_threads": eng.nixl_num_threads,
                    "backends": eng.nixl_backends,
                    "kv_lease_duration": eng.kv_lease_duration_s,
                    # Whether to pull or recompute is the router's decision (conditional
                    # disaggregation), not the connector's: always pull what prefill computed.
                    "kv_recompute_threshold": 0,
                    NIXL_PROGRESS_THREAD_KEY: eng.nixl_progress_thread,
                    NIXL_ORDERED_DESCRIPTORS_KEY: eng.nixl_ordered_descriptors,
                },
                # KV that cannot be read (prefill worker gone, transfer failed) is computed
                # again on the decode worker: slower, never wrong and never an error.
                kv_load_failure_policy="recompute",
            )
        kv_events = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=self.kv_events_endpoint,
            replay_endpoint=self.kv_events_replay_endpoint,
            topic=KV_EVENTS_TOPIC,
        )
        kwargs: dict[str, Any] = parse_engine_args(eng.engine_args,
                                                   f"worker {self.cfg.worker_id} engine_args")
        kwargs.update(
            model=eng.model,
            tokenizer=eng.tokenizer,
            served_model_name=[eng.name],
            dtype=eng.dtype,
            block_size=eng.block_size,
            max_model_len=eng.max_model_len,
            prefix_caching_hash_algo=eng.prefix_caching_hash_algo,
            tensor_parallel_size=eng.tensor_parallel_size,
            pipeline_parallel_size=eng.pipeline_parallel_size,
            kv_transfer_config=kv_transfer,
            kv_events_config=kv_events,
            disable_log_stats=False,
        )
        kwargs.setdefault("enable_log_requests", False)
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        """Create the engine (loads the model; tens of seconds on CPU)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine = AsyncLLM.from_engine_args(self.engine_args(),
                                                 stat_loggers=[stat_logger(self._on_step)])

    def shutdown(self) -> None:
        """Stop the engine and its engine-core process."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @property
    def engine(self) -> "AsyncLLM":
        if self._engine is None:
            raise RuntimeError("engine not started")
        return self._engine

    def record_link_step(self, iteration_stats: Any, engine_idx: int = 0) -> None:
        """One engine step's statistics of the engine link's requests (services/worker/
        link_stats.py): into vLLM's metrics of this worker, and into the step's speed figures
        (the step's scheduler report comes next, from the worker's own output handler)."""
        self._link_step = merged(self._link_step, iteration_stats)
        manager = self.engine.logger_manager
        if manager is not None:
            manager.record(scheduler_stats=None, iteration_stats=iteration_stats,
                           engine_idx=engine_idx)

    def _on_step(self, stats: Any, iteration_stats: Any = None) -> None:
        """The engine's figures of one step (vLLM's stat loggers): the scheduler's latest for
        the registry and the Stats RPC, the step's for the speed figures."""
        if stats is None:
            return
        iteration_stats, self._link_step = merged(iteration_stats, self._link_step), None
        self.speed.step(stats.num_running_reqs, stats.num_waiting_reqs, iteration_stats)
        c = self.counters
        c.num_running_reqs = stats.num_running_reqs
        c.num_waiting_reqs = stats.num_waiting_reqs
        c.kv_cache_usage = float(stats.kv_cache_usage)
        pcs = stats.prefix_cache_stats
        if pcs is not None:
            c.prefix_cache_queries += int(pcs.queries)
            c.prefix_cache_hits += int(pcs.hits)
        if self.metrics is not None and stats.kv_connector_stats:
            self.metrics.observe_connector_stats(stats.kv_connector_stats)
        c.last_step_at = time.time()

    def load(self) -> WorkerLoad:
        """The load snapshot published to the registry."""
        c = self.counters
        return WorkerLoad(
            in_flight=self.in_flight,
            num_running_reqs=c.num_running_reqs,
            num_waiting_reqs=c.num_waiting_reqs,
            kv_cache_usage=c.kv_cache_usage,
            updated_at=time.time(),
            **self.speed.figures(),
        )

    @property
    def in_flight(self) -> int:
        """Requests the engine has in flight from gateways (over the engine link)."""
        return self.link.in_flight if self.link is not None else 0

    @property
    def busy_since(self) -> float | None:
        """When the engine last got work after being idle (None while it has none)."""
        return self.link.busy_since if self.link is not None else None

    async def check_health(self) -> None:
        """Raises if the engine is dead."""
        await self.engine.check_health()

