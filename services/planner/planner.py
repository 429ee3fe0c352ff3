"""The planning loop: observe, estimate, decide, and write the desired pool sizes.

One `step()`:

1. Leader election (Kubernetes only): renew or acquire the Lease. Followers observe (so their
   metrics window is warm when they take over) but write nothing.
2. Observe: live workers and their load from the Redis registry, what the controller runs
   (`PoolSizes.observed()`), latency and throughput figures from the metrics source.
3. Estimate and decide per pool (services/planner/model.py).
4. Apply, gently ordered: a pool that grows gets its RayCluster replicas first (pods before
   actors), then its desired size in Redis; a pool that shrinks gets its desired size in Redis
   first (the controller drains a worker, then stops it), and its RayCluster replicas only
   once the controller reports no worker of that pool draining and no more than the desired
   number running. The RayCluster is compared with the target on every step, so a rejected
   patch is retried until it lands.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from redis.asyncio import Redis

from router.registry import WorkerInfo, WorkerRegistry
from services.controller.pool_sizes import POOLS, PoolObservation, PoolSizes
from services.planner.config import PlannerConfig
from services.planner.kube import GroupReplicas, KubeError, LeaseElector, RayClusterScaler
from services.planner.model import (Decision, Estimate, Gentleness, PoolSignals, PoolState,
                                    aggregated_estimate, decide, decode_estimate,
                                    prefill_estimate, slo_clear)
from services.planner.sources import DirectSource, MetricsSource, PoolFigures, PrometheusSource
from services.planner.telemetry import PlannerMetrics

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What one step saw and did."""

    leader: bool
    signals: dict[str, PoolSignals] = field(default_factory=dict)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    desired_written: dict[str, int] = field(default_factory=dict)
    kube_replicas: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def make_source(cfg: PlannerConfig) -> MetricsSource:
    """The metrics source the config names."""
    if cfg.metrics_source == "prometheus":
        assert cfg.prometheus_url is not None
        return PrometheusSource(cfg.prometheus_url, cfg.prometheus_queries, cfg.window_s,
                                cfg.scrape_timeout_s)
    return DirectSource(cfg.window_s, cfg.scrape_timeout_s)


def signals_for(pool: str, workers: list[WorkerInfo], figures: PoolFigures,
                observed: PoolObservation | None) -> PoolSignals:
    """One pool's signals: load from the registry, figures from the source, controller view."""
    ws = [w for w in workers if w.role.value == pool]
    return PoolSignals(
        serving=len(ws), starting=observed.starting if observed else 0,
        draining=observed.draining if observed else 0,
        ttft_p90_s=figures.ttft_p90_s, itl_p90_s=figures.itl_p90_s,
        prompt_tokens_per_s=figures.prompt_tokens_per_s,
        running=sum(w.load.num_running_reqs for w in ws),
        waiting=sum(w.load.num_waiting_reqs for w in ws),
        kv_usage=sum(w.load.kv_cache_usage for w in ws) / len(ws) if ws else 0.0,
        complete=figures.complete)


class Planner:
    """The SLA planner of one cluster. Drive it with `step()` (tests) or `run()`."""

    def __init__(self, cfg: PlannerConfig, redis: Redis, *, source: MetricsSource | None = None,
                 scaler: RayClusterScaler | None = None, elector: LeaseElector | None = None,
                 metrics: PlannerMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, identity: str = "planner") -> None:
        if (scaler is None) != (elector is None):
            raise ValueError("on Kubernetes a planner needs both a scaler and a lease elector")
        self.cfg = cfg
        self.redis = redis
        self.registry = WorkerRegistry(redis, cfg.namespace)
        self.pools = PoolSizes(redis, cfg.namespace)
        self.source = source or make_source(cfg)
        self.scaler = scaler
        self.elector = elector
        self.metrics = metrics or PlannerMetrics()
        self.clock = clock
        self.identity = identity
        self.rules = Gentleness(cfg.cooldown_up_s, cfg.cooldown_down_s)
        self.ttft_target_s, self.itl_target_s = cfg.ttft_p90_ms / 1000, cfg.itl_p90_ms / 1000
        self._states: dict[str, PoolState] = {}  # empty while not leading

    async def aclose(self) -> None:
        if self.elector is not None:
            await self.elector.release()
        await self.source.aclose()

    async def step(self) -> StepReport:
        """One planning pass; never raises for an unreachable dependency (it reports it)."""
        try:
            report = await self._step()
        except Exception as exc:  # Redis away, a bug: keep the loop alive, say what happened
            log.exception("planning step failed")
            self.metrics.steps.labels("error").inc()
            return StepReport(leader=False, errors=[f"{type(exc).__name__}: {exc}"])
        self.metrics.steps.labels("error" if report.errors else
                                  "leader" if report.leader else "follower").inc()
        return report

    async def _step(self) -> StepReport:
        leader = True if self.elector is None else await self.elector.try_acquire_or_renew()
        self.metrics.leader.set(1 if leader else 0)
        workers = await self.registry.live_workers()
        observed, _ = await self.pools.observed()
        figures = await self.source.collect(workers)
        report = StepReport(leader=leader)
        for pool in POOLS:
            report.signals[pool] = signals_for(pool, workers, figures.get(pool, PoolFigures()),
                                               observed.get(pool))
        self._export_signals(report.signals)
        if not leader:
            self._states.clear()  # on (re)gaining the lease, start from what Redis says
            return report

        now = self.clock()
        desired = await self.pools.desired()
        report.estimates = self._estimates(report.signals)
        clear = self._slo_clear(report.signals)
        for pool in POOLS:
            if pool not in desired and pool not in observed:
                continue  # the cluster has no such pool (the other mode's, or no controller yet)
            state = self._states.get(pool)
            if state is None:
                start = desired.get(pool, report.signals[pool].serving)
                state = self._states[pool] = PoolState(target=start)
            d = decide(state, report.estimates[pool], report.signals[pool],
                       self.cfg.limits(pool), self.rules, clear[pool], now)
            report.decisions[pool] = d
            self.metrics.decisions.labels(pool, d.direction, d.reason).inc()
            self.metrics.recommended.labels(pool).set(d.recommended)
            self.metrics.desired.labels(pool).set(d.target)
            if d.direction != "hold":
                log.info("%s: %s -> %d (%s; estimate %s)", pool, d.direction, d.target, d.reason,
                         report.estimates[pool].terms)
        await self._apply(report, desired, observed)
        return report

    def _estimates(self, signals: dict[str, PoolSignals]) -> dict[str, Estimate]:
        ttft_s, itl_s, cap = self.ttft_target_s, self.itl_target_s, self.cfg.capacity
        return {"prefill": prefill_estimate(signals["prefill"], ttft_s, cap),
                "decode": decode_estimate(signals["decode"], itl_s, cap),
                "both": aggregated_estimate(signals["both"], ttft_s, itl_s, cap)}

    def _slo_clear(self, signals: dict[str, PoolSignals]) -> dict[str, bool]:
        """Per pool, whether the SLO figures allow shrinking it. The prefill and decode pools
        serve the same requests, so they share one verdict: prefill TTFT and decode ITL."""
        ttft_s, itl_s, ratio = self.ttft_target_s, self.itl_target_s, self.cfg.scale_down_slo_ratio
        pd = slo_clear(signals["prefill"].ttft_p90_s, signals["decode"].itl_p90_s, ttft_s, itl_s,
                       ratio)
        both = slo_clear(signals["both"].ttft_p90_s, signals["both"].itl_p90_s, ttft_s, itl_s,
                         ratio)
        return {"prefill": pd, "decode": pd, "both": both}

    async def _apply(self, report: StepReport, desired: dict[str, int],
                     observed: dict[str, PoolObservation]) -> None:
        targets = {p: d.target for p, d in report.decisions.items()}
        kube_ok = set(POOLS)
        if self.scaler is not None:
            try:
                current = await self.scaler.replicas()
                want: dict[str, int] = {}
                for pool, n in targets.items():
                    if pool not in current:
                        continue
                    have = current[pool].replicas
                    obs = observed.get(pool)
                    drained = obs is not None and obs.draining == 0 and (
                        obs.serving + obs.starting <= n)
                    want[pool] = n if n >= have or drained else have
                if any(current[p].replicas != n for p, n in want.items()):
                    report.kube_replicas = await self.scaler.scale(
                        want, await self._pods_to_remove(current, want))
                else:
                    report.kube_replicas = {p: g.replicas for p, g in current.items()}
            except KubeError as exc:
                self.metrics.kube_errors.inc()
                report.errors.append(str(exc))
                log.warning("%s (tried again next step)", exc)
                # a pool that grows waits for its pods; one that shrinks drains regardless
                kube_ok = {p for p, n in targets.items() if n <= desired.get(p, n)}
        write = {p: n for p, n in targets.items() if p in kube_ok and desired.get(p) != n}
        if write:
            await self.pools.set_desired(write, by=f"planner/{self.identity}")
            report.desired_written = write

    async def _pods_to_remove(self, current: dict[str, GroupReplicas], want: dict[str, int]
                              ) -> dict[str, list[str]]:
        """For each group that shrinks, the pods hosting no live worker (a worker's `node` is
        its pod's host name), so KubeRay removes the drained pods, not serving ones."""
        assert self.scaler is not None
        shrinking = [p for p, n in want.items() if n < current[p].replicas]
        if not shrinking:
            return {}
        busy = {w.node for w in await self.registry.live_workers() if w.node}
        out: dict[str, list[str]] = {}
        for pool in shrinking:
            idle = await self.scaler.idle_pods(pool, busy)
            extra = current[pool].replicas - want[pool]
            if len(idle) < extra:
                log.warning("%s: %d pods to remove but only %d host no worker (%s); KubeRay "
                            "picks the rest", pool, extra, len(idle), idle)
            out[pool] = idle[:extra]
        return out

    def _export_signals(self, signals: dict[str, PoolSignals]) -> None:
        m = self.metrics
        pre, dec, both = signals["prefill"], signals["decode"], signals["both"]
        # the cluster's SLO figures: its prefill and decode pools', or (aggregated) its pool's
        m.ttft.set(_nan(pre.ttft_p90_s if pre.serving or not both.serving else both.ttft_p90_s))
        m.itl.set(_nan(dec.itl_p90_s if dec.serving or not both.serving else both.itl_p90_s))
        for pool, s in signals.items():
            m.prompt_rate.labels(pool).set(_nan(s.prompt_tokens_per_s))
            m.waiting.labels(pool).set(s.waiting)
            m.kv_usage.labels(pool).set(s.kv_usage)

    async def run(self, stop: asyncio.Event) -> None:
        """Step every `interval_s` until `stop` is set; then release the lease."""
        try:
            while not stop.is_set():
                await self.step()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.cfg.interval_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.aclose()


def _nan(v: float | None) -> float:
    return math.nan if v is None else v
