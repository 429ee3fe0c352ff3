"""The engine core of the gateway's vLLM front end: instead of one local engine-core process,
the cluster. It takes the `EngineCoreRequest`s vLLM's front end makes (tokenized, sampling
parameters validated) and runs each one through the route -> prefill -> KV -> decode handoff
over the engine links (services/link.py); the workers' per-step outputs come back as vLLM's
`EngineCoreOutputs`, for vLLM's own output processor (detokenizer, stop strings, logprobs,
n > 1) in the gateway.

    add_request_async(request)
      route (policy + prefix index)  -> prefill worker P and decode worker D (or D alone)
      P: a copy of the request, max_tokens=1, kv_transfer_params {do_remote_decode}
         -> the finished output's kv_transfer_params (where P holds the prompt's KV)
      D: the request with those kv_transfer_params: D pulls the KV over NIXL and decodes
    get_output_async()          every D's outputs, one message per engine step and worker
    abort_requests_async(ids)   aborts on whichever worker holds the request; a request
                                between P and D frees P's blocks through D's connector

A worker that fails or leaves the registry under a request ends it with vLLM's ERROR finish
reason (the client sees a 500); moving it to another worker is the migrate stage's job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import msgspec
import zmq.asyncio

from router.registry import WorkerInfo
from services.gateway.audit_ticket import AuditTicket
from services.gateway.link_client import LinkClient
from services.gateway.pd_flow import PDFlow, WorkerUnavailable
from services.gateway.worker_directory import WorkerDirectory

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest

log = logging.getLogger(__name__)

PREFILL_SUFFIX = "-prefill"


@dataclass
class _Flight:
    """One front-end request on its way through the cluster."""

    request: "EngineCoreRequest"
    task: asyncio.Task | None = None
    decode: WorkerInfo | None = None
    prefill: WorkerInfo | None = None
    prefill_done: asyncio.Future | None = None
    kv_params: dict[str, Any] | None = None
    counted: bool = False
    audit: AuditTicket | None = None
    started: float = field(default_factory=time.monotonic)


class RemoteEngineCore:
    """What vLLM's AsyncLLM needs of an engine-core client, served by the cluster."""

    def __init__(self, directory: WorkerDirectory, flow: PDFlow,
                 prefill_timeout_s: float = 120.0) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

        self._directory = directory
        self._flow = flow
        self._prefill_timeout_s = prefill_timeout_s
        self._ctx = zmq.asyncio.Context()
        self._links: dict[str, LinkClient] = {}
        self._flights: dict[str, _Flight] = {}
        self._by_prefill_id: dict[str, _Flight] = {}
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._output_type, self._outputs_type = EngineCoreOutput, EngineCoreOutputs
        self._error = FinishReason.ERROR
        # what AsyncLLM reads of its engine-core client
        self.engine_ranks_managed = [0]
        self.resources = SimpleNamespace(engine_dead=False)
        self._watch = asyncio.create_task(self._watch_workers(), name="link-watch")

    # --- the engine-core client contract ------------------------------------------------------
    async def add_request_async(self, request: "EngineCoreRequest") -> None:
        flight = _Flight(request)
        self._flights[request.request_id] = flight
        flight.task = asyncio.create_task(self._dispatch(flight),
                                          name=f"dispatch-{request.request_id}")

    async def get_output_async(self) -> "EngineCoreOutputs":
        return await self._outputs.get()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        by_worker: dict[str, list[str]] = {}
        for request_id in request_ids:
            flight = self._flights.pop(request_id, None)
            if flight is None:
                continue
            if flight.task is not None and not flight.task.done():
                flight.task.cancel()  # still routing or prefilling: _dispatch cleans up
            elif flight.decode is not None:
                self._count(flight, -1)
                by_worker.setdefault(flight.decode.worker_id, []).append(request_id)
        for worker_id, ids in by_worker.items():
            if (link := self._links.get(worker_id)) is not None:
                await link.abort(ids)

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    def dp_engines_running(self) -> bool:
        return bool(self._flights)

    def get_kv_event_sources(self) -> dict:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        self._watch.cancel()
        for flight in self._flights.values():
            if flight.task is not None:
                flight.task.cancel()
        for link in self._links.values():
            link.close()
        self._ctx.term()

    # --- the handoff -------------------------------------------------------------------------
    async def _dispatch(self, flight: _Flight) -> None:
        request = flight.request
        try:
            route = await self._flow.route(request.prompt_token_ids or [])
        except WorkerUnavailable as exc:
            self._finish_with_error(request.request_id, str(exc))
            return
        flight.decode = route.decode
        flight.audit = self._flow.audit_ticket(route, request.request_id, announce=True,
                                               trace_headers=request.trace_headers)
        kv_params = None
        self._count(flight, +1)
        try:
            with self._directory.track(route.prefill):
                if route.prefill is not None:
                    kv_params = await self._prefill(flight, route.prefill)
                decode_request = request
                if kv_params is not None:
                    params = request.sampling_params.clone()
                    params.extra_args = {**(params.extra_args or {}),
                                         "kv_transfer_params": kv_params}
                    decode_request = msgspec.structs.replace(request, sampling_params=params)
                    flight.kv_params = kv_params
                await self._link(route.decode).add(decode_request)
                kv_params = None  # D owns the KV now
        except asyncio.CancelledError:
            self._count(flight, -1)
            if kv_params is not None:  # prefilled, never decoded: P frees its blocks via D
                await self._release(route.decode, request.request_id, kv_params)
            raise
        except Exception as exc:
            log.exception("request %s: dispatch failed", request.request_id)
            self._finish_with_error(request.request_id, f"{type(exc).__name__}: {exc}")

    async def _prefill(self, flight: _Flight, worker: WorkerInfo) -> dict[str, Any] | None:
        """The KV transfer parameters of the prompt prefilled on `worker`, or None when the
        prefill failed (the decode worker then computes the prompt itself)."""
        from vllm.sampling_params import RequestOutputKind

        request = flight.request
        params = request.sampling_params.clone()
        params.max_tokens, params.min_tokens, params.n = 1, 0, 1
        params.logprobs = params.prompt_logprobs = None
        params.structured_outputs = None  # the grammar is the decode worker's business
        params.output_kind = RequestOutputKind.FINAL_ONLY
        params.extra_args = {**(params.extra_args or {}),
                             "kv_transfer_params": {"do_remote_decode": True}}
        prefill_id = request.request_id + PREFILL_SUFFIX
        prefill_request = msgspec.structs.replace(request, request_id=prefill_id,
                                                  sampling_params=params)
        flight.prefill = worker
        flight.prefill_done = asyncio.get_running_loop().create_future()
        self._by_prefill_id[prefill_id] = flight
        link = self._link(worker)
        try:
            await link.add(prefill_request)
            return await asyncio.wait_for(asyncio.shield(flight.prefill_done),
                                          self._prefill_timeout_s)
        except asyncio.CancelledError:
            await link.abort([prefill_id])
            raise
        except Exception as exc:
            log.warning("request %s: prefill on %s failed (%s); the decode worker computes "
                        "the prompt", request.request_id, worker.worker_id, exc)
            await link.abort([prefill_id])
            return None
        finally:
            self._by_prefill_id.pop(prefill_id, None)

    async def _release(self, decode: WorkerInfo, request_id: str,
                       kv_params: dict[str, Any]) -> None:
        """Free KV a prefill worker holds for a decode that will not run: a request the decode
        engine admits and aborts at once, so its connector tells the prefill worker (vLLM's
        notify_kv_transfer_request_rejected)."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.engine import EngineCoreRequest

        reject = EngineCoreRequest(
            request_id=f"{request_id}-release", prompt_token_ids=[0], mm_features=None,
            sampling_params=SamplingParams(max_tokens=1,
                                           extra_args={"kv_transfer_params": kv_params}),
            pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
            data_parallel_rank=None, abort_immediately=True)
        try:
            await self._link(decode).add(reject)
        except Exception:
            log.warning("request %s: could not release its prefilled KV", request_id,
                        exc_info=True)

    def _count(self, flight: _Flight, delta: int) -> None:
        """A request is in flight on its decode worker (for load-aware routing) from its
        dispatch until it finishes, fails or is aborted."""
        if flight.decode is None or flight.counted == (delta > 0):
            return
        flight.counted = delta > 0
        counts = self._directory.in_flight
        counts[flight.decode.worker_id] += delta
        if counts[flight.decode.worker_id] <= 0:
            del counts[flight.decode.worker_id]

    # --- links and their messages -------------------------------------------------------------
    def _link(self, worker: WorkerInfo) -> LinkClient:
        link = self._links.get(worker.worker_id)
        if link is None or link.address != worker.link_address:
            if link is not None:
                link.close()
            if not worker.link_address:
                raise WorkerUnavailable(f"worker {worker.worker_id} serves no engine link")
            link = LinkClient(self._ctx, worker.worker_id, worker.link_address,
                              self._on_outputs, self._on_failed)
            self._links[worker.worker_id] = link
        return link

    def _on_outputs(self, worker_id: str, outputs: "EngineCoreOutputs") -> None:
        forward = []
        for out in outputs.outputs:
            flight = self._by_prefill_id.get(out.request_id)
            if flight is not None:  # a prefill's one token: only its KV parameters matter
                if flight.audit is not None:
                    flight.audit.offer_output(worker_id, out)
                if out.finish_reason is not None and not flight.prefill_done.done():
                    if out.kv_transfer_params:
                        flight.prefill_done.set_result(dict(out.kv_transfer_params))
                    else:
                        flight.prefill_done.set_exception(
                            RuntimeError("the prefill returned no kv_transfer_params"))
                continue
            if (flight := self._flights.get(out.request_id)) is not None:
                if flight.audit is not None:
                    flight.audit.offer_output(worker_id, out)
                forward.append(out)
                if out.finish_reason is not None:
                    del self._flights[out.request_id]
                    self._count(flight, -1)
        if forward:
            # this process's clock: vLLM's front end times requests against it
            self._outputs.put_nowait(self._outputs_type(outputs=forward,
                                                        timestamp=time.monotonic()))

    def _on_failed(self, worker_id: str, request_id: str, message: str) -> None:
        flight = self._by_prefill_id.get(request_id)
        if flight is not None and flight.prefill_done is not None:
            if not flight.prefill_done.done():
                flight.prefill_done.set_exception(RuntimeError(message))
            return
        log.warning("request %s: worker %s refused it: %s", request_id, worker_id, message)
        self._finish_with_error(request_id, message)

    def _finish_with_error(self, request_id: str, reason: str) -> None:
        """End a request with vLLM's ERROR finish reason (the front end answers 500)."""
        if (flight := self._flights.pop(request_id, None)) is None:
            return
        self._count(flight, -1)
        log.warning("request %s failed: %s", request_id, reason)
        self._outputs.put_nowait(self._outputs_type(
            outputs=[self._output_type(request_id=request_id, new_token_ids=[],
                                       finish_reason=self._error)],
            timestamp=time.monotonic()))

    async def _watch_workers(self) -> None:
        """Requests on a worker that left the registry (died, or was replaced) end in an
        error instead of waiting for outputs that will never come."""
        while True:
            await asyncio.sleep(0.5)
            live = {w.worker_id for w in self._directory.workers}
            for worker_id in [w for w in self._links if w not in live]:
                self._links.pop(worker_id).close()
                for request_id, flight in list(self._flights.items()):
                    if flight.decode is not None and flight.decode.worker_id == worker_id:
                        self._finish_with_error(request_id, f"worker {worker_id} is gone")

