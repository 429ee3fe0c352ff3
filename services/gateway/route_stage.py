"""The route stage of the gateway's pipeline: which workers serve a request.

    prompt token ids -> prefix index lookup (every candidate's longest cached prefix)
                     -> shortlist per pool (services/gateway/route_shortlist.py)
                     -> routing policy (router/policies.py) -> RouteDecision (prefill, decode)

It also keeps this gateway's dispatch ledger (router/dispatch_ledger.py: the load it sent
each worker since the worker's last heartbeat) and makes each request's routing audit ticket
(services/gateway/audit_ticket.py). The hand-off itself (prefill, KV, decode, migration) is the
engine core's: services/gateway/remote_core.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Sequence

from router.block_hash import BlockHasher
from router.dispatch_ledger import DispatchLedger
from router.policies import (KVPolicy, NoWorkersError, RouteDecision, RouteRequest,
                             RoutingPolicy, decision_is_forced)
from router.prefix_index import PrefixIndex
from router.route_audit import predicted_tokens
from router.registry import WorkerInfo, WorkerRole
from services.gateway.audit_ticket import AuditTicket
from services.gateway.config import MigrationConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_shortlist import PoolShortlist
from services.gateway.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """No worker could take the request (none live, or the chosen ones failed)."""


class RouteStage:
    """Chooses the workers of each request, and keeps the ledger of what it sent them."""

    def __init__(self, directory: WorkerDirectory, policy: RoutingPolicy,
                 index: PrefixIndex | None, metrics: GatewayMetrics,
                 migration: MigrationConfig | None = None) -> None:
        self.directory = directory
        self.migration = migration or MigrationConfig()
        self.policy = policy
        self.index = index
        self.metrics = metrics
        self._hashers: dict[tuple[int, str, str], BlockHasher] = {}
        kv = policy.config if isinstance(policy, KVPolicy) else None
        #: the workers the kv policy scores in a large pool (None: every worker)
        self.shortlist = (PoolShortlist(directory, kv.shortlist_holders,
                                        kv.shortlist_least_loaded) if kv is not None else None)

    def _hasher(self, scheme: tuple[int, str, str]) -> BlockHasher:
        """The hasher of a (block size, algorithm, seed) scheme, made once."""
        if scheme not in self._hashers:
            self._hashers[scheme] = BlockHasher(*scheme)
        return self._hashers[scheme]

    async def _cached_blocks(self, token_ids: Sequence[int], workers: list[WorkerInfo],
                             cache_salt: str | None = None,
                             hashes: dict[str, list[int]] | None = None
                             ) -> dict[str, int] | None:
        """Every worker's longest cached prefix of the prompt: one hash pass per hashing
        scheme in use (normally one), one Redis round trip per scheme; a prefix this gateway
        has just sent to a worker counts before the index knows it (the dispatch ledger's
        pending prefixes). None: no index, or it could not be asked. `hashes` gets each
        worker's block hashes of the prompt."""
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
                blocks = self._hasher(scheme).block_hashes(token_ids, cache_salt=cache_salt)
                if hashes is not None:
                    hashes.update(dict.fromkeys(ids, blocks))
                if blocks:
                    found = dict(await health.call(
                        lambda h=blocks, i=ids: index.longest_prefixes(h, i)))
                    for w, n in self.ledger.pending_prefixes(blocks, ids).items():
                        found[w] = max(found.get(w, 0), n)
                    cached.update(found)
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
        hashes: dict[str, list[int]] = {}
        cached = (await self._cached_blocks(token_ids, prefill + decode, cache_salt, hashes)
                  if lookup else None)
        if lookup and self.shortlist is not None:  # score the holders and the least loaded
            prefill = self.shortlist.candidates(prefill, cached or {}, exclude)
            decode = self.shortlist.candidates(decode, cached or {}, exclude)
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
                decision.predicted_cached_blocks, decision.computes.block_size, len(token_ids)),
                prompt_blocks=tuple(hashes.get(decision.computes.worker_id, ())))
        return decision

    def audit_ticket(self, route: RouteDecision, request_id: str = "", **kw: Any
                     ) -> AuditTicket | None:
        """The routing audit of a request on `route` (None when the route predicted
        nothing); see services/gateway/audit_ticket.py."""
        return AuditTicket.of(self.metrics.route_audit, route, request_id=request_id, **kw)

    @property
    def ledger(self) -> DispatchLedger:
        """This gateway's dispatches (router/dispatch_ledger.py), read by the kv policy."""
        return self.directory.ledger

    def sent(self, route: RouteDecision, request_id: str, num_tokens: int) -> None:
        """`request_id` (a prompt of `num_tokens`) went to the workers of `route`: into the
        ledger, the worker that computes the prompt with the part the index did not predict
        cached and the prompt's block hashes (its pending prefix there until the request
        ends). Its first token and its end are `ledger.first_token` / `ledger.finished`."""
        computes = route.computes
        uncached = max(num_tokens - route.predicted_cached_blocks * computes.block_size, 0)
        for w in (route.prefill, route.decode):
            if w is not None:
                self.ledger.sent(request_id, w.worker_id, num_tokens, uncached, w is computes,
                                 route.prompt_blocks if w is computes else ())
