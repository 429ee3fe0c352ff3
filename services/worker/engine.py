"""The vLLM engine a worker owns, with the prefill / generate / abort operations of its API.

One `AsyncLLM` per worker. Its role decides the KV connector: `prefill` is a NIXL KV producer
(computes a prompt and holds its blocks for a decode worker to pull), `decode` a NIXL KV
consumer (pulls those blocks instead of computing them), `both` has no connector. Prefix caching
and the engine's KV-cache event publisher (ZMQ) are on in every role.

vLLM is imported lazily, after the worker has set the engine's environment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from router.registry import WorkerLoad, WorkerRole
from services.worker.config import (NIXL_ORDERED_DESCRIPTORS_KEY, NIXL_PROGRESS_THREAD_KEY,
                                    WorkerConfig)
from services.worker.engine_args import parse as parse_engine_args
from services.worker.engine_speed import EngineSpeed
from services.worker.link_stats import merged

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv"
# Our own key in the connector's transfer parameters: the wall-clock time by which a decode
# worker must have taken the request, or the prefill worker's lease may lapse before the
# decode engine reads (and renews) the blocks; past it, decode computes the prompt itself.
LEASE_DEADLINE_KEY = "splitserve_accept_by"


def lease_accept_window(lease_s: float) -> float:
    """Seconds after a prefill within which a decode worker may still pull its KV.

    The prefill worker frees unread blocks ``lease_s`` after the prefill; a decode engine
    renews the lease by heartbeats every ``lease_s / 6`` once the request waits in its
    scheduler. A third of the lease (at least one heartbeat interval) plus a second is kept
    as margin: past the window, the KV is recomputed, never read from freed blocks.
    """
    return max(0.5, lease_s * 2 / 3 - 1.0)


@dataclass
class Sampling:
    """Sampling parameters as they arrive over the worker API."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False


@dataclass
class Chunk:
    """Tokens generated since the previous chunk."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int


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
        self.in_flight: set[str] = set()
        #: when `in_flight` last went from empty to non-empty (None while it is empty)
        self.busy_since: float | None = None
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

        from services.worker import detokenizer_fix

        detokenizer_fix.install()

        host = self

        from vllm.v1.metrics.loggers import StatLoggerBase

        class _LoadRecorder(StatLoggerBase):
            """Keeps the scheduler's latest figures for the registry and Stats RPC."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    host._on_scheduler_stats(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        self._engine = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=[_LoadRecorder])

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

    def _on_scheduler_stats(self, stats: Any, iteration_stats: Any = None) -> None:
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
            in_flight=len(self.in_flight) + (self.link.in_flight if self.link else 0),
            num_running_reqs=c.num_running_reqs,
            num_waiting_reqs=c.num_waiting_reqs,
            kv_cache_usage=c.kv_cache_usage,
            updated_at=time.time(),
            **self.speed.figures(),
        )

    # --- requests --------------------------------------------------------------------------
    def _sampling_params(self, s: Sampling, kv_transfer_params: dict[str, Any] | None) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            stop_token_ids=list(s.stop_token_ids) or None,
            ignore_eos=s.ignore_eos,
            include_stop_str_in_output=s.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )

    async def prefill(self, request_id: str, token_ids: list[int], s: Sampling) -> tuple[dict, int]:
        """Compute the prompt's KV and hold it for a decode worker; return the connector's
        transfer parameters and the number of prompt tokens that were prefix-cache hits."""
        if self.cfg.role != WorkerRole.PREFILL:
            raise ValueError(f"worker {self.cfg.worker_id} is {self.cfg.role.value}, not prefill")
        one = Sampling(max_tokens=1, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                       ignore_eos=True)
        params = self._sampling_params(one, {"do_remote_decode": True})
        final = None
        async for out in self._run(request_id, token_ids, params):
            final = out
        if final is None or not final.kv_transfer_params:
            raise RuntimeError(f"prefill of {request_id} returned no kv_transfer_params")
        out = dict(final.kv_transfer_params)
        out[LEASE_DEADLINE_KEY] = time.time() + lease_accept_window(
            self.cfg.engine.kv_lease_duration_s)
        return out, int(final.num_cached_tokens or 0)

    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        s: Sampling,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Generate, yielding a chunk per engine step; the first chunk carries prompt figures."""
        if kv_transfer_params and self.cfg.role != WorkerRole.DECODE:
            raise ValueError(
                f"worker {self.cfg.worker_id} is {self.cfg.role.value}: only decode workers "
                "take KV from a prefill worker")
        if kv_transfer_params:
            kv_transfer_params = dict(kv_transfer_params)
            accept_by = kv_transfer_params.pop(LEASE_DEADLINE_KEY, None)
            if accept_by is not None and time.time() > float(accept_by):
                # Too late to pull safely: free the prefill worker's blocks, compute locally.
                self.counters.lease_expired += 1
                log.warning("request %s: KV lease window passed %.2fs ago; recomputing the "
                            "prompt locally", request_id, time.time() - float(accept_by))
                try:
                    await self.engine.notify_kv_transfer_request_rejected(
                        f"{request_id}-lease-expired", kv_transfer_params)
                except Exception:
                    log.warning("could not release %s on its prefill worker", request_id,
                                exc_info=True)
                kv_transfer_params = None
        params = self._sampling_params(s, kv_transfer_params)
        async for out in self._run(request_id, token_ids, params):
            comp = out.outputs[0]
            yield Chunk(
                token_ids=list(comp.token_ids),
                text=comp.text,
                finish_reason=comp.finish_reason if out.finished else None,
                num_prompt_tokens=len(token_ids),
                num_cached_tokens=int(out.num_cached_tokens or 0),
            )

    async def _run(self, request_id: str, token_ids: list[int], params: Any) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        if request_id in self.in_flight:
            raise ValueError(f"request id {request_id} is already in flight on this worker")
        if not self.in_flight:
            self.busy_since = time.time()
        self.in_flight.add(request_id)
        self.counters.requests_total += 1
        kv_params = (params.extra_args or {}).get("kv_transfer_params") or {}
        self.speed.started(request_id, len(token_ids),
                           remote=bool(kv_params.get("do_remote_prefill")))
        finished = False
        first = True
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=token_ids), params, request_id
            ):
                if first:
                    self.speed.first_output(request_id)
                    first = False
                finished = out.finished
                yield out
        finally:
            self.speed.ended(request_id)
            self.in_flight.discard(request_id)
            if not self.in_flight:
                self.busy_since = None
            if not finished:
                # Cancelled (client went away) or failed: make sure the engine forgets it.
                self.counters.requests_aborted += 1
                await self.engine.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request by id; whether it was in flight here."""
        found = request_id in self.in_flight
        await self.engine.abort(request_id)
        return found

    async def release(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Free the prefill worker's blocks held for a decode that will not run (decode side)."""
        if self.cfg.role != WorkerRole.DECODE:
            raise ValueError("release is sent to the decode worker that would have pulled the KV")
        kv_transfer_params = {k: v for k, v in kv_transfer_params.items()
                              if k != LEASE_DEADLINE_KEY}
        await self.engine.notify_kv_transfer_request_rejected(request_id, kv_transfer_params)

    async def check_health(self) -> None:
        """Raises if the engine is dead."""
        await self.engine.check_health()


def dumps_params(params: dict[str, Any] | None) -> str:
    """Serialise connector parameters for the wire."""
    return json.dumps(params, separators=(",", ":")) if params else ""


def loads_params(text: str) -> dict[str, Any] | None:
    """Parse connector parameters from the wire."""
    return json.loads(text) if text else None
