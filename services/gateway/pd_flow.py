"""The request path inside the gateway: route, prefill on one worker, decode on another.

    route (policy) -> Prefill(prefill worker) -> kv_transfer_params
                   -> Generate(decode worker, kv_transfer_params) -> stream of chunks

With `both` workers (aggregated) or a routing decision of local prefill, the decode worker
computes the prompt itself and no KV moves. If the caller goes away at any point, the request
is aborted on every worker it touched, and KV blocks a prefill worker holds for a decode that
will not happen are released (through the decode worker's connector).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import grpc

from pydantic import BaseModel, Field

from router.block_hash import BlockHasher
from router.policies import (NoWorkersError, RouteDecision, RouteRequest, RoutingPolicy,
                             decision_is_forced)
from router.prefix_index import PrefixIndex
from router.route_audit import predicted_tokens
from router.registry import WorkerInfo, WorkerRole
from services.gateway.audit_ticket import AuditTicket
from services.gateway.metrics import GatewayMetrics
from services.gateway.stop_strings import StopStrings
from services.gateway.worker_directory import WorkerDirectory
from services.proto.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """No worker could take the request (none live, or the chosen ones failed)."""


class _DecodeFailed(Exception):
    """A decode worker failed mid-request (the request may continue elsewhere)."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(reason)
        self.worker_id = worker_id


# Worker failures a request survives by moving on (INVALID_ARGUMENT is the request's fault).
_RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})


class MigrationConfig(BaseModel):
    """How the gateway keeps requests alive through worker failures."""

    max_migrations: int = Field(3, ge=0, description=(
        "decode workers a request may move to after the one it started on fails"))
    stall_timeout_s: float = Field(60.0, gt=0, description=(
        "a decode stream silent this long counts as a failed worker (the request moves)"))
    prefill_timeout_s: float = Field(120.0, gt=0, description=(
        "a prefill slower than this is abandoned: the decode worker computes the prompt"))
    route_wait_s: float = Field(30.0, ge=0, description=(
        "with no serving decode worker while the controller brings workers up, wait this "
        "long for one before 503 (with none coming: 503 at once)"))


@dataclass
class GenerationResult:
    """What the gateway learned about a finished (or failed) request."""

    route: RouteDecision | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    audit: AuditTicket | None = None
    """The routing audit of the first route (None: it predicted nothing)."""


class StallWatch:
    """Fires `timeout` (an `asyncio.timeout(None)` around the reads) when one read of a
    decode stream has waited `stall_s`. A read costs two attribute writes; one timer per
    stream looks at the read in progress every `stall_s` at most."""

    def __init__(self, timeout: asyncio.Timeout, stall_s: float) -> None:
        self._timeout = timeout
        self._stall_s = stall_s
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the read in progress started
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> "StallWatch":
        self._timer = self._loop.call_at(self._loop.time() + self._stall_s, self._check)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def reading(self) -> None:
        self._since = self._loop.time()

    def idle(self) -> None:
        self._since = None

    def _check(self) -> None:
        now = self._loop.time()
        if self._since is not None and now - self._since >= self._stall_s:
            self._timer = None
            self._timeout.reschedule(now)  # expires now: the read is cancelled, TimeoutError
            return
        due = (self._since if self._since is not None else now) + self._stall_s
        self._timer = self._loop.call_at(due, self._check)


class PDFlow:
    """Runs requests through the prefill -> KV transfer -> decode path."""

    def __init__(self, directory: WorkerDirectory, policy: RoutingPolicy,
                 index: PrefixIndex | None, metrics: GatewayMetrics,
                 timeout_s: float = 600.0, migration: MigrationConfig | None = None) -> None:
        self.directory = directory
        self.migration = migration or MigrationConfig()
        self.policy = policy
        self.index = index
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._hashers: dict[tuple[int, str, str], BlockHasher] = {}
        self._cleanup_tasks: set[asyncio.Task] = set()

    def _hasher(self, scheme: tuple[int, str, str]) -> BlockHasher:
        """The hasher of a (block size, algorithm, seed) scheme, made once."""
        if scheme not in self._hashers:
            self._hashers[scheme] = BlockHasher(*scheme)
        return self._hashers[scheme]

    async def _cached_blocks(self, token_ids: Sequence[int], workers: list[WorkerInfo],
                             cache_salt: str | None = None) -> dict[str, int] | None:
        """Every worker's longest cached prefix of the prompt: one hash pass per hashing
        scheme in use (normally one), one Redis round trip per scheme. None: no index, or
        it could not be asked."""
        if self.index is None or not workers:
            return None
        health = self.directory.health
        if not health.available:  # Redis failed lately: do not wait on it again
            self.metrics.index_errors.inc()
            return None
        start = time.perf_counter()
        by_scheme: dict[tuple[int, str, str], list[str]] = {}
        for w in workers:
            by_scheme.setdefault((w.block_size, w.hash_algo, w.hash_seed), []).append(w.worker_id)
        cached: dict[str, int] = {}
        index = self.index
        try:
            for scheme, ids in by_scheme.items():
                hashes = self._hasher(scheme).block_hashes(token_ids, cache_salt=cache_salt)
                if hashes:
                    cached.update(await health.call(
                        lambda h=hashes, i=ids: index.longest_prefixes(h, i)))
        except Exception as exc:  # Redis away: route on load alone (last registry snapshot)
            log.warning("prefix index lookup failed (%s: %s); routing on load only",
                        type(exc).__name__, exc)
            self.metrics.index_errors.inc()
            return None
        self.metrics.index_lookup.observe(time.perf_counter() - start)
        return cached

    async def _candidates(self, exclude: frozenset[str] = frozenset()
                          ) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
        """Serving (prefill, decode-or-both) workers not in `exclude`; with no decode-capable
        one, wait up to `route_wait_s` while the pools heal or grow."""
        d = self.directory
        deadline = time.monotonic() + self.migration.route_wait_s
        while True:
            prefill = [w for w in d.by_role(WorkerRole.PREFILL) if w.worker_id not in exclude]
            decode = [w for w in (d.by_role(WorkerRole.DECODE) or d.by_role(WorkerRole.BOTH))
                      if w.worker_id not in exclude]
            if decode or time.monotonic() >= deadline or not await d.pools_healing():
                return prefill, decode  # served, waited long enough, or nothing is coming
            await asyncio.sleep(0.25)

    async def can_route(self) -> bool:
        """Whether a request can be routed: a decode-capable worker serves (without a prefill
        worker the decode worker computes the prompt), now or once the healing pools bring one
        up within `route_wait_s`: the same wait as `route`'s."""
        return bool((await self._candidates())[1])

    async def route(self, token_ids: Sequence[int], exclude: frozenset[str] = frozenset(),
                    cache_salt: str | None = None) -> RouteDecision:
        """Choose the workers for a prompt among the serving ones (not in `exclude`); with
        none to serve it, wait up to `route_wait_s` for the pools to heal or grow. The prompt
        is looked up in the prefix index as the engines hash it (with its `cache_salt`)."""
        d = self.directory
        prefill, decode = await self._candidates(exclude)
        lookup = self.policy.uses_prefix_index and not decision_is_forced(prefill, decode)
        cached = (await self._cached_blocks(token_ids, prefill + decode, cache_salt)
                  if lookup else None)
        req = RouteRequest(num_tokens=len(token_ids), cached_blocks=cached or {},
                           in_flight=dict(d.in_flight), own=d.ledger.view(
                               {w.worker_id: w.load.updated_at for w in prefill + decode})
                           if lookup else None)
        try:
            decision = self.policy.choose(prefill, decode, req)
        except NoWorkersError as exc:
            raise WorkerUnavailable(str(exc)) from None
        self.metrics.routes.labels(self.policy.name, decision.outcome).inc()
        if lookup:
            self.metrics.predicted_cached_blocks.observe(decision.predicted_cached_blocks)
        if cached is not None:  # chosen with the index: the prediction can be audited
            decision = dataclasses.replace(decision, predicted_cached_tokens=predicted_tokens(
                decision.predicted_cached_blocks, decision.computes.block_size, len(token_ids)))
        return decision

    def audit_ticket(self, route: RouteDecision, request_id: str = "", **kw: Any
                     ) -> AuditTicket | None:
        """The routing audit of a request on `route` (None when the route predicted
        nothing); see services/gateway/audit_ticket.py."""
        return AuditTicket.of(self.metrics.route_audit, route, request_id=request_id, **kw)

    async def stream(self, request_id: str, token_ids: list[int], sampling: pb.SamplingParams,
                     result: GenerationResult) -> AsyncIterator[pb.GenerateChunk]:
        """Yield the decode worker's chunks; fills `result` as it goes.

        When the decode worker fails (dies, its engine dies, it stalls), the request goes on
        on another decode worker: the prompt plus the tokens generated so far, for the tokens
        still wanted; the caller sees one stream without gaps or repeats. A failed prefill
        worker makes the decode worker compute the prompt itself.
        """
        result.num_prompt_tokens = len(token_ids)
        stops = (StopStrings(sampling.stop, sampling.include_stop_str_in_output)
                 if sampling.stop else None)
        failed: set[str] = set()
        attempt = 0
        while True:
            prompt = token_ids + result.token_ids
            wanted = sampling.max_tokens - len(result.token_ids)
            part = pb.SamplingParams()
            part.CopyFrom(sampling)
            part.max_tokens = wanted
            if stops is not None:  # the gateway holds back text, not the engine
                part.include_stop_str_in_output = True
            route = await self.route(prompt, frozenset(failed))
            if attempt == 0:
                result.route = route
                result.audit = self.audit_ticket(route, request_id)
            sub_id = request_id if attempt == 0 else f"{request_id}.m{attempt}"
            try:
                async with contextlib.aclosing(self._attempt(
                        sub_id, prompt, part, route, result, first=attempt == 0)) as chunks:
                    async for chunk in chunks:
                        if stops is None:
                            yield chunk
                            continue
                        chunk.text = stops.feed(chunk.text)
                        if stops.matched is not None and not chunk.finish_reason:
                            # A stop string the worker has not seen (it began on the worker
                            # before a migration): end here; closing the attempt aborts it.
                            result.finish_reason = chunk.finish_reason = "stop"
                            yield chunk
                            return
                        if chunk.finish_reason and stops.matched is None:
                            chunk.text += stops.flush()
                        yield chunk
                return
            except _DecodeFailed as exc:
                failed.add(exc.worker_id)
                attempt += 1
                if attempt > self.migration.max_migrations:
                    raise WorkerUnavailable(
                        f"request failed on {attempt} decode workers; last: {exc}") from None
                self.metrics.migrations.inc()
                log.warning("request %s: decode worker %s failed after %d tokens (%s); "
                            "continuing on another worker", request_id, exc.worker_id,
                            len(result.token_ids), exc)

    async def _attempt(self, request_id: str, token_ids: list[int], sampling: pb.SamplingParams,
                       route: RouteDecision, result: GenerationResult, first: bool
                       ) -> AsyncIterator[pb.GenerateChunk]:
        """One try of a request on one route."""
        touched: list[WorkerInfo] = []
        kv_params = ""
        decode_started = False
        finished = False
        decode_first = False
        ledger = self.directory.ledger
        computes = route.prefill or route.decode
        uncached = max(len(token_ids) - route.predicted_cached_blocks * computes.block_size, 0)
        for w in (route.prefill, route.decode):
            if w is not None:
                ledger.sent(request_id, w.worker_id, len(token_ids), uncached, w is computes)
        with self.directory.track(route.prefill, route.decode):
            try:
                if route.prefill is not None:
                    touched.append(route.prefill)
                    try:
                        resp = await self._prefill(route.prefill, request_id, token_ids, sampling)
                        ledger.finished(request_id, route.prefill.worker_id)
                        kv_params = resp.kv_transfer_params_json
                        if first and result.audit is not None:
                            result.audit.offer(route.prefill.worker_id, resp.num_cached_tokens)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                            raise
                        # The prefill worker failed or timed out: decode computes the prompt.
                        self.metrics.prefill_fallbacks.inc()
                        log.warning("request %s: prefill on %s failed (%s); decode worker "
                                    "prefills locally", request_id, route.prefill.worker_id,
                                    exc.code().name)
                touched.append(route.decode)
                call = self.directory.generate(
                    route.decode,
                    pb.GenerateRequest(request_id=request_id, prompt_token_ids=token_ids,
                                       sampling=sampling, kv_transfer_params_json=kv_params),
                    timeout=self.timeout_s)
                decode_started = True
                try:
                    # One timer per stream that looks at the read in progress now and then
                    # (asyncio.wait_for or a rescheduled timeout per chunk cost a timer per token).
                    try:
                        async with asyncio.timeout(None) as watchdog:
                            with StallWatch(watchdog, self.migration.stall_timeout_s) as watch:
                                async for chunk in self._read(call, watch):
                                    if not decode_first:
                                        decode_first = True
                                        ledger.first_token(request_id, route.decode.worker_id)
                                    if chunk.num_prompt_tokens and first:
                                        result.num_cached_tokens = chunk.num_cached_tokens
                                        if result.audit is not None:
                                            result.audit.offer(route.decode.worker_id,
                                                               chunk.num_cached_tokens)
                                    result.completion_tokens += len(chunk.token_ids)
                                    result.token_ids.extend(chunk.token_ids)
                                    if chunk.finish_reason:
                                        result.finish_reason = chunk.finish_reason
                                    yield chunk
                    except TimeoutError:  # raised by the expired watchdog's context exit
                        raise _DecodeFailed(route.decode.worker_id, "stalled") from None
                    finished = True
                finally:
                    if not finished:
                        call.cancel()
            except grpc.aio.AioRpcError as exc:
                if decode_started and exc.code() in _RETRYABLE:
                    raise _DecodeFailed(route.decode.worker_id,
                                        f"{exc.code().name}: {exc.details()}") from None
                raise self._map_rpc_error(exc) from None
            finally:
                ledger.finished(request_id)
                if not finished:
                    self._cleanup(request_id, touched, route, kv_params, decode_started)

    @staticmethod
    async def _read(call: Any, watch: "StallWatch") -> AsyncIterator[pb.GenerateChunk]:
        """The decode stream's chunks; `watch` times each read (not the consumer's pace)."""
        while True:
            watch.reading()
            chunk = await call.read()
            watch.idle()
            if chunk is grpc.aio.EOF:
                return
            yield chunk

    async def _prefill(self, worker: WorkerInfo, request_id: str, token_ids: list[int],
                       sampling: pb.SamplingParams) -> pb.PrefillResponse:
        return await self.directory.stub(worker).Prefill(
            pb.PrefillRequest(request_id=request_id, prompt_token_ids=token_ids,
                              sampling=sampling),
            timeout=self.migration.prefill_timeout_s)

    @staticmethod
    def _map_rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(exc.details())
        return WorkerUnavailable(f"worker call failed: {exc.code().name}: {exc.details()}")

    def _cleanup(self, request_id: str, touched: list[WorkerInfo], route: RouteDecision,
                 kv_params: str, decode_started: bool) -> None:
        """Abort on every touched worker, in a task of its own (the caller may be cancelled)."""

        async def run() -> None:
            calls = [self.directory.stub(w).Abort(pb.AbortRequest(request_id=request_id),
                                                  timeout=10) for w in touched]
            if kv_params and not decode_started:
                calls.append(self.directory.stub(route.decode).Release(
                    pb.ReleaseRequest(request_id=request_id, kv_transfer_params_json=kv_params),
                    timeout=10))
            results = await asyncio.gather(*calls, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    log.warning("cleanup of %s: %s", request_id, r)
            log.info("request %s aborted on %s", request_id, [w.worker_id for w in touched])

        task = asyncio.create_task(run())
        self._cleanup_tasks.add(task)
        task.add_done_callback(self._cleanup_tasks.discard)
