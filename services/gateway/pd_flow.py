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
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import grpc

from router.block_hash import BlockHasher
from router.policies import NoWorkersError, RouteDecision, RouteRequest, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo, WorkerRole
from services.gateway.metrics import GatewayMetrics
from services.gateway.worker_directory import WorkerDirectory
from services.proto.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """No worker could take the request (none live, or the chosen ones failed)."""


@dataclass
class GenerationResult:
    """What the gateway learned about a finished (or failed) request."""

    route: RouteDecision | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)


class PDFlow:
    """Runs requests through the prefill -> KV transfer -> decode path."""

    def __init__(self, directory: WorkerDirectory, policy: RoutingPolicy,
                 index: PrefixIndex | None, metrics: GatewayMetrics,
                 timeout_s: float = 600.0) -> None:
        self.directory = directory
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

    async def _cached_blocks(self, token_ids: Sequence[int], workers: list[WorkerInfo]
                             ) -> dict[str, int]:
        """Every worker's longest cached prefix of the prompt: one hash pass per hashing
        scheme in use (normally one), one Redis round trip per scheme."""
        if self.index is None or not workers:
            return {}
        start = time.perf_counter()
        by_scheme: dict[tuple[int, str, str], list[str]] = {}
        for w in workers:
            by_scheme.setdefault((w.block_size, w.hash_algo, w.hash_seed), []).append(w.worker_id)
        cached: dict[str, int] = {}
        try:
            for scheme, ids in by_scheme.items():
                hashes = self._hasher(scheme).block_hashes(token_ids)
                if hashes:
                    cached.update(await self.index.longest_prefixes(hashes, ids))
        except Exception:  # Redis away: route on load alone (last registry snapshot)
            log.warning("prefix index lookup failed; routing on load only", exc_info=True)
            self.metrics.index_errors.inc()
            return {}
        self.metrics.index_lookup.observe(time.perf_counter() - start)
        return cached

    async def route(self, token_ids: Sequence[int]) -> RouteDecision:
        d = self.directory
        prefill = d.by_role(WorkerRole.PREFILL)
        decode = d.by_role(WorkerRole.DECODE) or d.by_role(WorkerRole.BOTH)
        cached = (await self._cached_blocks(token_ids, prefill + decode)
                  if self.policy.uses_prefix_index else {})
        req = RouteRequest(num_tokens=len(token_ids), cached_blocks=cached,
                           in_flight=dict(d.in_flight))
        try:
            decision = self.policy.choose(prefill, decode, req)
        except NoWorkersError as exc:
            raise WorkerUnavailable(str(exc)) from None
        self.metrics.routes.labels(self.policy.name, decision.outcome).inc()
        self.metrics.predicted_cached_blocks.observe(decision.predicted_cached_blocks)
        return decision

    async def stream(self, request_id: str, token_ids: list[int], sampling: pb.SamplingParams,
                     result: GenerationResult) -> AsyncIterator[pb.GenerateChunk]:
        """Yield the decode worker's chunks; fills `result` as it goes."""
        route = await self.route(token_ids)
        result.route = route
        result.num_prompt_tokens = len(token_ids)
        touched: list[WorkerInfo] = []
        kv_params = ""
        decode_started = False
        finished = False
        with self.directory.track(route.prefill, route.decode):
            try:
                if route.prefill is not None:
                    touched.append(route.prefill)
                    resp = await self._prefill(route.prefill, request_id, token_ids, sampling)
                    kv_params = resp.kv_transfer_params_json
                touched.append(route.decode)
                call = self.directory.stub(route.decode).Generate(
                    pb.GenerateRequest(request_id=request_id, prompt_token_ids=token_ids,
                                       sampling=sampling, kv_transfer_params_json=kv_params),
                    timeout=self.timeout_s)
                decode_started = True
                try:
                    async for chunk in call:
                        if chunk.num_prompt_tokens:
                            result.num_cached_tokens = chunk.num_cached_tokens
                        result.completion_tokens += len(chunk.token_ids)
                        result.token_ids.extend(chunk.token_ids)
                        if chunk.finish_reason:
                            result.finish_reason = chunk.finish_reason
                        yield chunk
                    finished = True
                finally:
                    if not finished:
                        call.cancel()
            except grpc.aio.AioRpcError as exc:
                raise self._map_rpc_error(exc) from None
            finally:
                if not finished:
                    self._cleanup(request_id, touched, route, kv_params, decode_started)

    async def _prefill(self, worker: WorkerInfo, request_id: str, token_ids: list[int],
                       sampling: pb.SamplingParams) -> pb.PrefillResponse:
        return await self.directory.stub(worker).Prefill(
            pb.PrefillRequest(request_id=request_id, prompt_token_ids=token_ids,
                              sampling=sampling),
            timeout=self.timeout_s)

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
