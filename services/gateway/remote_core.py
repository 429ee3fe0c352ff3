"""The engine core of the gateway's front end (vLLM's AsyncLLM): instead of one local
engine-core process, the cluster. It takes the `EngineCoreRequest`s vLLM's front end makes
(tokenized, sampling parameters validated) and runs each one through the route -> prefill ->
KV -> decode handoff over the engine links (services/link.py); the workers' per-step outputs
come back as vLLM's `EngineCoreOutputs`, for vLLM's own output processor (detokenizer, stop
strings, logprobs, n > 1) in the gateway.

    add_request_async(request)
      route (policy + prefix index)  -> prefill worker P and decode worker D (or D alone)
      P: a copy of the request, max_tokens=1, kv_transfer_params {do_remote_decode}
         -> the finished output's kv_transfer_params (where P holds the prompt's KV)
      D: the request with those kv_transfer_params: D pulls the KV over NIXL and decodes
    get_output_async()          every D's outputs, one message per engine step and worker
    abort_requests_async(ids)   aborts on whichever worker holds the request; a request
                                between P and D frees P's blocks through D's connector

A decode worker that fails under a request (its engine dies, its link drops, it leaves the
registry, or it goes silent for `stall_timeout_s`) does not end the request: it continues on
another worker as the prompt plus the tokens generated so far, for the tokens still wanted
(`max_migrations` times at most). The front end holds the text, stop strings, logprobs and
usage, so the client sees one stream. A request whose continuation would not be the same
request ends with vLLM's ERROR finish reason instead (the client sees a 500): seeded sampling,
structured output (the grammar's state stays on the dead worker), presence or frequency
penalties, bad words, a thinking budget and repetition detection (they look at the tokens
generated so far, which move into the prompt), watermarking, and prompt embeddings or
multimodal input. A request that had produced no token yet
starts over whatever its parameters. A failed prefill worker makes the decode worker compute
the prompt itself.
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
from services.gateway.route_note import RouteNote, current_route
from services.gateway.link_client import LinkClient
from services.link import LinkKeys
from services.gateway.route_stage import RouteStage, WorkerUnavailable
from services.gateway.reserved_fields import reserved_extra_args
from services.gateway.tenancy import TenantSalts
from services.gateway.worker_directory import WorkerDirectory

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest

log = logging.getLogger(__name__)

PREFILL_SUFFIX = "-prefill"


@dataclass
class _Flight:
    """One front-end request on its way through the cluster."""

    request: "EngineCoreRequest"
    wire_id: str = ""  # its id on the worker: the request's own, `.mN` after N migrations
    task: asyncio.Task | None = None
    decode: WorkerInfo | None = None
    prefill: WorkerInfo | None = None
    prefill_done: asyncio.Future | None = None
    kv_params: dict[str, Any] | None = None
    prefill_cached: int | None = None  # the prefill worker's cache hits, for usage
    counted: bool = False  # in flight on its decode worker (and in the dispatch ledger)
    decoding: bool = False  # its decode worker has sent an output (this attempt)
    generated: list[int] = field(default_factory=list)
    migrations: int = 0
    failed: set[str] = field(default_factory=set)  # workers it failed on
    last_output: float = field(default_factory=time.monotonic)
    audit: AuditTicket | None = None
    started: float = field(default_factory=time.monotonic)
    note: RouteNote | None = None  # the route headers' note of the request (route_note.py)


def cannot_move(request: "EngineCoreRequest") -> str | None:
    """Why a request that has produced tokens cannot continue on another worker as the same
    request (None: it can)."""
    sp = request.sampling_params
    if sp is None or request.prompt_token_ids is None or request.mm_features:
        return "its input is not token ids alone"
    if sp.structured_outputs is not None:
        return "structured output (the grammar's state is lost with the worker)"
    if sp.temperature > 0 and sp.seed is not None:
        return "seeded sampling (the sampler's state is lost with the worker)"
    if sp.presence_penalty or sp.frequency_penalty:
        return "presence or frequency penalties (they count the tokens generated so far)"
    if sp.bad_words:
        return "bad words (they look at the tokens generated so far)"
    if sp.thinking_token_budget is not None or sp.repetition_detection:
        return "a thinking budget or repetition detection (they count the tokens so far)"
    if sp.watermarking:
        return "watermarking (its state is lost with the worker)"
    return None


class RemoteEngineCore:
    """What vLLM's AsyncLLM needs of an engine-core client, served by the cluster."""

    def __init__(self, directory: WorkerDirectory, routes: RouteStage,
                 salts: TenantSalts | None = None, request_timeout_s: float = 600.0) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

        self._directory = directory
        self._routes = routes
        self._ledger = routes.ledger
        self._salts = salts
        self._migration = routes.migration
        self._metrics = routes.metrics
        self._request_timeout_s = request_timeout_s
        self._ctx = zmq.asyncio.Context()
        self._links: dict[str, LinkClient] = {}
        self._link_keys = LinkKeys.derive(directory.secret)  # CURVE, from the cluster secret
        self._flights: dict[str, _Flight] = {}  # by the front end's request id
        self._by_wire_id: dict[str, _Flight] = {}  # by the id on the decode worker
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
        if self._salts is not None:  # tenant isolation: the tenant's cache_salt
            salt = self._salts.for_request(request.cache_salt)
            if salt != request.cache_salt:
                request = msgspec.structs.replace(request, cache_salt=salt)
        flight = _Flight(request, wire_id=request.request_id, note=current_route.get())
        self._flights[request.request_id] = flight
        self._by_wire_id[flight.wire_id] = flight
        if (reserved := reserved_extra_args(request.sampling_params.extra_args
                                            if request.sampling_params else None)):
            self._finish_with_error(request.request_id, f"the client set {reserved}, which "
                                    "the gateway owns (services/gateway/reserved_fields.py)")
            return
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
            self._by_wire_id.pop(flight.wire_id, None)
            if flight.task is not None and not flight.task.done():
                flight.task.cancel()  # still routing or prefilling: _dispatch cleans up
            elif flight.decode is not None:
                self._count(flight, -1)
                by_worker.setdefault(flight.decode.worker_id, []).append(flight.wire_id)
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
        """Idempotent: vLLM's server shuts its engine client down, then the gateway does."""
        if self._ctx.closed:
            return
        self._watch.cancel()
        for flight in self._flights.values():
            if flight.task is not None:
                flight.task.cancel()
        for link in self._links.values():
            link.close()
        self._ctx.term()

    # --- the handoff -------------------------------------------------------------------------
    async def _dispatch(self, flight: _Flight) -> None:
        request = self._attempt_request(flight)
        try:
            route = await self._routes.route(request.prompt_token_ids or [],
                                             frozenset(flight.failed), request.cache_salt)
        except WorkerUnavailable as exc:
            self._finish_with_error(flight.request.request_id, str(exc))
            return
        flight.decode = route.decode
        flight.last_output = time.monotonic()
        if not flight.migrations:  # the audit is of the first route (a move is no prediction)
            flight.audit = self._routes.audit_ticket(route, request.request_id, announce=True,
                                                     trace_headers=request.trace_headers)
            if flight.note is not None and not flight.note.decode:  # n > 1: the first's
                flight.note.decode = route.decode.worker_id
                flight.note.prefill = route.prefill.worker_id if route.prefill else "local"
                flight.note.reason, flight.note.audit = route.reason, flight.audit
        kv_params = None
        self._routes.sent(route, flight.wire_id, len(request.prompt_token_ids or ()))
        flight.decoding = False
        self._count(flight, +1)
        try:
            with self._directory.track(route.prefill):
                if route.prefill is not None:
                    kv_params = await self._prefill(flight, request, route.prefill)
                decode_request = request
                if kv_params is not None:
                    params = request.sampling_params.clone()
                    params.extra_args = {**(params.extra_args or {}),
                                         "kv_transfer_params": kv_params}
                    decode_request = msgspec.structs.replace(request, sampling_params=params)
                    flight.kv_params = kv_params
                    cached = kv_params.get("remote_prefill_cached_tokens")
                    flight.prefill_cached = cached if isinstance(cached, int) else None
                await self._link(route.decode).add(decode_request)
                kv_params = None  # D owns the KV now
            if route.decode.worker_id in flight.failed:  # it failed while we handed off
                self._fail_over(flight, route.decode.worker_id, "it failed during the hand-off")
        except asyncio.CancelledError:
            self._count(flight, -1)
            if kv_params is not None:  # prefilled, never decoded: P frees its blocks via D
                await self._release(route.decode, request.request_id, kv_params)
            raise
        except Exception as exc:
            log.exception("request %s: dispatch failed", request.request_id)
            self._finish_with_error(flight.request.request_id, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _attempt_request(flight: _Flight) -> "EngineCoreRequest":
        """What the next worker gets: the request itself, or after a failure the prompt plus
        the tokens generated so far, for the tokens still wanted, under a new id (the dead
        worker's engine may still know the old one)."""
        request = flight.request
        if not flight.migrations:
            return request
        n = len(flight.generated)
        params = request.sampling_params.clone()
        if params.max_tokens is not None:
            params.max_tokens -= n
        params.min_tokens = max(0, params.min_tokens - n)
        if n:
            params.prompt_logprobs = None  # the client has them from the first worker
        return msgspec.structs.replace(
            request, request_id=flight.wire_id, sampling_params=params,
            prompt_token_ids=[*(request.prompt_token_ids or []), *flight.generated])

    async def _prefill(self, flight: _Flight, request: "EngineCoreRequest",
                       worker: WorkerInfo) -> dict[str, Any] | None:
        """The KV transfer parameters of the prompt prefilled on `worker`, or None when the
        prefill failed (the decode worker then computes the prompt itself)."""
        from vllm.sampling_params import RequestOutputKind

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
                                          self._migration.prefill_timeout_s)
        except asyncio.CancelledError:
            await link.abort([prefill_id])
            raise
        except Exception as exc:
            self._metrics.prefill_fallbacks.inc()
            log.warning("request %s: prefill on %s failed (%s); the decode worker computes "
                        "the prompt", request.request_id, worker.worker_id,
                        exc or type(exc).__name__)
            await link.abort([prefill_id])
            return None
        finally:
            self._by_prefill_id.pop(prefill_id, None)
            self._ledger.finished(flight.wire_id, worker.worker_id)

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
        dispatch until it finishes, fails or is aborted; at its end it leaves the dispatch
        ledger too."""
        if flight.decode is None or flight.counted == (delta > 0):
            return
        flight.counted = delta > 0
        if delta < 0:
            self._ledger.finished(flight.wire_id)
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
                              self._on_outputs, self._on_failed, self._on_lost,
                              self._link_keys)
            self._links[worker.worker_id] = link
        return link

    def _on_outputs(self, worker_id: str, outputs: "EngineCoreOutputs") -> None:
        forward = []
        now = time.monotonic()
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
            flight = self._by_wire_id.get(out.request_id)
            if flight is None or flight.decode is None or flight.decode.worker_id != worker_id:
                continue  # aborted, or from a worker the request has left
            if flight.audit is not None:
                flight.audit.offer_output(worker_id, out)
            if not flight.decoding:
                flight.decoding = True
                self._ledger.first_token(flight.wire_id, worker_id)
            flight.generated.extend(out.new_token_ids)
            flight.last_output = now
            if flight.prefill_cached is not None and out.prefill_stats is not None:
                # as vLLM's output processor does for a request that came with the prefill's
                # kv_transfer_params (remote_prefill_cached_tokens): usage counts the
                # prefill worker's cache hits, not the decode's ~100% hit by KV transfer
                out.prefill_stats.num_cached_tokens = flight.prefill_cached
                flight.prefill_cached = None
            out.request_id = flight.request.request_id
            forward.append(out)
            if out.finish_reason is not None:
                self._forget(flight)
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
        if (flight := self._by_wire_id.get(request_id)) is None:
            return
        log.warning("request %s: worker %s refused it: %s", request_id, worker_id, message)
        self._finish_with_error(flight.request.request_id, message)

    def _on_lost(self, worker_id: str, request_ids: list[str] | None, reason: str) -> None:
        """Requests on `worker_id` that it will not finish (None: all of them) move on."""
        if request_ids is None:
            lost = [f for f in self._flights.values()
                    if (f.decode is not None and f.decode.worker_id == worker_id)
                    or (f.prefill is not None and f.prefill.worker_id == worker_id)]
        else:
            lost = [f for i in request_ids
                    if (f := self._by_wire_id.get(i) or self._by_prefill_id.get(i)) is not None]
        for flight in lost:
            self._fail_over(flight, worker_id, reason)

    def _fail_over(self, flight: _Flight, worker_id: str, reason: str) -> None:
        """`worker_id` failed under `flight`: a prefill falls back to the decode worker; a
        decode continues on another worker, or ends with an error when it cannot."""
        if (flight.prefill is not None and flight.prefill.worker_id == worker_id
                and flight.prefill_done is not None and not flight.prefill_done.done()):
            flight.prefill_done.set_exception(RuntimeError(f"worker {worker_id}: {reason}"))
            return
        if flight.decode is None or flight.decode.worker_id != worker_id:
            return
        if (flight.task is not None and not flight.task.done()
                and flight.task is not asyncio.current_task()):
            flight.failed.add(worker_id)  # still being handed to it: the hand-off moves it
            return
        request_id = flight.request.request_id
        why = cannot_move(flight.request) if flight.generated else None
        if why is None and flight.migrations >= self._migration.max_migrations:
            why = f"it already moved {flight.migrations} times"
        if why is not None:
            self._finish_with_error(request_id, f"worker {worker_id} failed ({reason}) "
                                    f"after {len(flight.generated)} tokens and the request "
                                    f"cannot move: {why}")
            return
        self._count(flight, -1)
        self._by_wire_id.pop(flight.wire_id, None)
        if (link := self._links.get(worker_id)) is not None:  # in case it lives on (a stall)
            asyncio.create_task(self._abort_quietly(link, flight.wire_id))
        flight.failed.add(worker_id)
        flight.migrations += 1
        flight.wire_id = f"{request_id}.m{flight.migrations}"
        self._by_wire_id[flight.wire_id] = flight
        flight.decode = None
        self._metrics.migrations.inc()
        log.warning("request %s: decode worker %s failed after %d tokens (%s); continuing on "
                    "another worker", request_id, worker_id, len(flight.generated), reason)
        flight.task = asyncio.create_task(self._dispatch(flight),
                                          name=f"dispatch-{flight.wire_id}")

    @staticmethod
    async def _abort_quietly(link: LinkClient, wire_id: str) -> None:
        try:
            await link.abort([wire_id])
        except Exception:  # the link is gone with its worker: nothing to abort
            pass

    def _forget(self, flight: _Flight) -> None:
        self._flights.pop(flight.request.request_id, None)
        self._by_wire_id.pop(flight.wire_id, None)

    def _finish_with_error(self, request_id: str, reason: str) -> None:
        """End a request with vLLM's ERROR finish reason (the front end answers 500)."""
        if (flight := self._flights.get(request_id)) is None:
            return
        self._forget(flight)
        self._count(flight, -1)
        log.warning("request %s failed: %s", request_id, reason)
        self._outputs.put_nowait(self._outputs_type(
            outputs=[self._output_type(request_id=request_id, new_token_ids=[],
                                       finish_reason=self._error)],
            timestamp=time.monotonic()))

    def _expire(self, flight: _Flight) -> None:
        """End a request that has run longer than `request_timeout_s`, on its workers too."""
        link = self._links.get(flight.decode.worker_id) if flight.decode is not None else None
        wire_id = flight.wire_id
        if flight.task is not None and not flight.task.done():
            flight.task.cancel()  # routing or prefilling: _dispatch cleans up
        self._finish_with_error(flight.request.request_id,
                                f"it ran longer than {self._request_timeout_s:g} s "
                                "(request_timeout_s)")
        if link is not None:
            asyncio.create_task(self._abort_quietly(link, wire_id))

    async def _watch_workers(self) -> None:
        """Requests on a worker that left the registry (died, or was replaced), or whose
        decode worker has been silent for `stall_timeout_s`, move on instead of waiting for
        outputs that will never come; requests older than `request_timeout_s` end."""
        while True:
            await asyncio.sleep(0.5)
            expired = time.monotonic() - self._request_timeout_s
            for flight in [f for f in self._flights.values() if f.started < expired]:
                self._expire(flight)
            live = {w.worker_id for w in self._directory.workers}
            for worker_id in [w for w in self._links if w not in live]:
                self._links.pop(worker_id).close()
                self._on_lost(worker_id, None, "it left the registry")
            stalled = time.monotonic() - self._migration.stall_timeout_s
            for flight in list(self._flights.values()):
                if (flight.decode is not None and flight.last_output < stalled
                        and flight.task is not None and flight.task.done()):
                    self._fail_over(flight, flight.decode.worker_id,
                                    f"no output for {self._migration.stall_timeout_s:g} s")

