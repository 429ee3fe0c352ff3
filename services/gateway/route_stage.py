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
from collections.abc import Container
from types import MappingProxyType
from typing import Any, Sequence

from router.block_hash import BlockHasher
from router.dispatch_ledger import DispatchLedger
from router.policies import (KVPolicy, NoWorkersError, RouteDecision, RouteRequest,
                             RoutingPolicy, decision_is_forced)
from router.prefix_depths import PrefixDepths
from router.prefix_index import PrefixIndex
from router.route_audit import predicted_tokens
from router.registry import WorkerInfo
from router.replicated_index import ReplicatedPrefixIndex
from services.gateway.audit_ticket import AuditTicket
from services.gateway.config import DEFAULT_HASH_CACHE_BLOCKS, MigrationConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_shortlist import PoolShortlist
from services.gateway.serving_pools import Scheme, ServingPools, Without, scheme_of
from services.gateway.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """No worker could take the request (none live, or the chosen ones failed)."""


class RouteStage:
    """Chooses the workers of each request, and keeps the ledger of what it sent them."""

    def __init__(self, directory: WorkerDirectory, policy: RoutingPolicy,
                 index: PrefixIndex | None, metrics: GatewayMetrics,
                 migration: MigrationConfig | None = None,
                 hash_cache_blocks: int = DEFAULT_HASH_CACHE_BLOCKS) -> None:
        """``hash_cache_blocks``: block digests each hashing scheme's hasher remembers
        (GatewayConfig.hash_cache_blocks; 0: none)."""
        self.directory = directory
        self.migration = migration or MigrationConfig()
        self.policy = policy
        self.index = index
        self.metrics = metrics
        self.hash_cache_blocks = hash_cache_blocks
        self._hashers: dict[Scheme, BlockHasher] = {}
        self._routed: dict[str, Any] = {}  # outcome -> its routes counter (labels looked up once)
        #: the replica's lookup, answered with no await (None: no replica)
        self._local = index.local_prefixes if isinstance(index, ReplicatedPrefixIndex) else None
        kv = policy.config if isinstance(policy, KVPolicy) else None
        #: the workers the kv policy scores in a large pool (None: every worker)
        self.shortlist = (PoolShortlist(directory, kv.shortlist_holders,
                                        kv.shortlist_least_loaded) if kv is not None else None)

    def _hasher(self, scheme: Scheme) -> BlockHasher:
        """The hasher of a (block size, algorithm, seed) scheme, made once."""
        if scheme not in self._hashers:
            self._hashers[scheme] = BlockHasher(*scheme, cache_size=self.hash_cache_blocks)
        return self._hashers[scheme]

    async def _cached_blocks(self, token_ids: Sequence[int], pools: ServingPools,
                             exclude: frozenset[str], cache_salt: str | None,
                             hashes: dict[Scheme, list[int]]) -> dict[str, int] | None:
        """Every candidate's longest cached prefix of the prompt (the pools' workers not in
        `exclude`): one hash pass per hashing scheme in use (normally one), one lookup per
        scheme (the replica's, else a Redis round trip); a prefix this gateway has just sent
        to a worker counts before the index knows it (the dispatch ledger's pending
        prefixes). None: no index, or it could not be asked. `hashes` gets each scheme's
        block hashes of the prompt."""
        if self.index is None:
            return None
        health = self.directory.health
        if not health.available:  # Redis failed lately: do not wait on it again
            self.metrics.index_errors.inc()
            return None
        start = time.perf_counter()
        cached: dict[str, int] | None = None
        index, local, ledger = self.index, self._local, self.ledger
        try:
            for scheme, ids in pools.schemes.items():
                eligible: Container[str] = pools.eligible[scheme]
                if exclude and (gone := sum(1 for w in exclude if w in eligible)):
                    if gone == len(ids):
                        continue  # every worker of this scheme is excluded
                    eligible = Without(eligible, exclude)
                    ids = tuple(w for w in ids if w not in exclude)
                blocks = self._hasher(scheme).block_hashes(token_ids, cache_salt=cache_salt)
                hashes[scheme] = blocks
                if not blocks:
                    continue
                found = local(blocks, eligible) if local is not None else None
                if found is None:
                    found = dict(await health.call(
                        lambda h=blocks, i=ids: index.longest_prefixes(h, i)))
                pending = ledger.pending_prefixes(blocks, eligible)
                if not pending:
                    pass
                elif isinstance(found, PrefixDepths):
                    found.raise_all(pending)  # its levels stay valid for the shortlist
                else:
                    for w, n in pending.items():
                        found[w] = max(found.get(w, 0), n)
                cached = found if cached is None else {**cached, **found}
        except Exception as exc:  # Redis away: route on load alone (last registry snapshot)
            log.warning("prefix index lookup failed (%s: %s); routing on load only",
                        type(exc).__name__, exc)
            self.metrics.index_errors.inc()
            return None
        if cached is None:
            if not hashes:  # no candidate at all
                return None
            cached = {}
        self.metrics.index_lookup.observe(time.perf_counter() - start)
        return cached

    async def _pools(self, exclude: frozenset[str] = frozenset()) -> ServingPools:
        """The serving pools; with no decode-capable worker outside `exclude`, wait up to
        `route_wait_s` while the pools heal or grow."""
        d = self.directory
        deadline = time.monotonic() + self.migration.route_wait_s
        while True:
            pools = d.pools()
            if (len(pools.decode) > pools.decode.excluded(exclude)
                    or time.monotonic() >= deadline or not await d.pools_healing()):
                return pools  # served, waited long enough, or nothing is coming
            await asyncio.sleep(0.25)

    async def can_route(self) -> bool:
        """Whether a request can be routed: a decode-capable worker serves (without a prefill
        worker the decode worker computes the prompt), now or once the healing pools bring one
        up within `route_wait_s`: the same wait as `route`'s."""
        return len((await self._pools()).decode) > 0

    async def route(self, token_ids: Sequence[int], exclude: frozenset[str] = frozenset(),
                    cache_salt: str | None = None) -> RouteDecision:
        """Choose the workers for a prompt among the serving ones (not in `exclude`); with
        none to serve it, wait up to `route_wait_s` for the pools to heal or grow. The prompt
        is looked up in the prefix index as the engines hash it (with its `cache_salt`).

        Nothing here visits a whole pool (but a policy that scores every worker, or a forced
        route, takes the pools whole): the pools are arranged once per registry snapshot
        (services/gateway/serving_pools.py), the lookup lists only the workers holding the
        prompt's first block, the shortlist comes from the load order kept between snapshots,
        and `exclude` (a retry's failed workers) is taken out where it matters."""
        d = self.directory
        pools = d.pools()
        if len(pools.decode) <= pools.decode.excluded(exclude):  # none to decode: wait a while
            pools = await self._pools(exclude)
        pp, dp = pools.prefill, pools.decode
        n_prefill, n_decode = len(pp) - pp.excluded(exclude), len(dp) - dp.excluded(exclude)
        forced = n_decode == 1 and decision_is_forced(pp.workers if n_prefill else (),
                                                      dp.without(exclude))
        lookup = self.policy.uses_prefix_index and not forced
        prefill: Sequence[WorkerInfo]
        decode: Sequence[WorkerInfo]
        hashes: dict[Scheme, list[int]] = {}
        cached = None
        own = None
        if lookup:
            cached = (await self._cached_blocks(token_ids, pools, exclude, cache_salt, hashes)
                      if n_prefill + n_decode else None)
            if self.shortlist is not None:  # score the holders and the least loaded
                prefill = self.shortlist.candidates(pp, cached or {}, exclude)
                decode = self.shortlist.candidates(dp, cached or {}, exclude)
            else:
                prefill, decode = pp.without(exclude), dp.without(exclude)
            own = d.ledger.view({w.worker_id: w.load.updated_at for w in (*prefill, *decode)})
        else:
            prefill, decode = pp.without(exclude), dp.without(exclude)
        # the policy reads the counts while it decides (no await: they cannot move meanwhile)
        req = RouteRequest(num_tokens=len(token_ids), cached_blocks=cached or {},
                           in_flight=MappingProxyType(d.in_flight), own=own)
        try:
            decision = self.policy.choose(prefill, decode, req)
        except NoWorkersError as exc:
            raise WorkerUnavailable(str(exc)) from None
        routed = self._routed.get(decision.outcome)
        if routed is None:
            routed = self._routed[decision.outcome] = self.metrics.routes.labels(
                self.policy.name, decision.outcome)
        routed.inc()
        if lookup:
            self.metrics.predicted_cached_blocks.observe(decision.predicted_cached_blocks)
        if cached is not None:  # chosen with the index: the prediction can be audited
            decision = dataclasses.replace(decision, predicted_cached_tokens=predicted_tokens(
                decision.predicted_cached_blocks, decision.computes.block_size, len(token_ids)),
                prompt_blocks=tuple(hashes.get(scheme_of(decision.computes), ())))
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
