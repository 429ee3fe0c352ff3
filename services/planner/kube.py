"""Kubernetes side of the planner: scale a KubeRay RayCluster's worker groups, elect one leader.

Both use the official `kubernetes` client (synchronous; called through `asyncio.to_thread`).

- `RayClusterScaler` sets `spec.workerGroupSpecs[i].replicas` of the groups named for the
  pools (`group_names`: prefill, decode, both) with a JSON patch whose `test` op pins the
  group's name at index `i`, so a concurrent edit that reorders the groups makes the patch fail
  (422) instead of scaling the wrong group. A group that shrinks names the pods to remove in
  `scaleStrategy.workersToDelete` (as Ray's own autoscaler does): the pods that host no live
  worker (the drained ones), else KubeRay would delete pods at random, serving ones included. Rejected patches (409, 422, 429, 5xx, connection
  errors) are tried again after re-reading the object.
- `LeaseElector` is a step-driven take on client-go's Lease lock (`coordination.k8s.io/v1`):
  get → create, renew, or take over an expired lease with an update carrying the read
  `resourceVersion`, so of two planners racing for it the API server lets only one win (409
  for the other). Expiry is judged on this process's clock from when the lease record was
  last seen to change (as client-go does), not on the holder's timestamps, so clock skew
  between hosts does not matter. The client's own `kubernetes.leaderelection` runs a blocking
  thread loop on the global default client, which does not fit `Planner.step()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from services.planner.config import KubeConfig

log = logging.getLogger(__name__)

RETRIABLE = {409, 422, 429, 500, 502, 503, 504}
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"


class KubeError(RuntimeError):
    """A Kubernetes call that failed for good (after its tries)."""


def api_client(cfg: KubeConfig, user_agent: str) -> k8s.ApiClient:
    """An ApiClient from a kubeconfig file, or from the pod's service account."""
    from kubernetes import config as kconfig

    conf = k8s.Configuration()
    if cfg.kubeconfig:
        kconfig.load_kube_config(config_file=cfg.kubeconfig, context=cfg.context,
                                 client_configuration=conf)
    else:
        kconfig.load_incluster_config(client_configuration=conf)
    api = k8s.ApiClient(conf)
    api.user_agent = user_agent
    return api


def default_identity() -> str:
    """host-pid: unique per planner process (a pod's host name is its name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class GroupReplicas:
    """One worker group of the RayCluster as read."""

    index: int
    replicas: int
    min_replicas: int
    max_replicas: int


class RayClusterScaler:
    """Reads and sets the replicas of a RayCluster's worker groups (one per pool)."""

    def __init__(self, api: k8s.ApiClient, cfg: KubeConfig,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.api = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)
        self.cfg = cfg
        self._sleep = sleep

    async def _get(self) -> dict:
        return await asyncio.to_thread(
            self.api.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION, self.cfg.namespace,
            RAY_PLURAL, self.cfg.raycluster)

    def groups(self, obj: dict) -> dict[str, GroupReplicas]:
        """Pool -> its worker group, for the pools whose group exists in `obj`."""
        specs = obj.get("spec", {}).get("workerGroupSpecs", []) or []
        out: dict[str, GroupReplicas] = {}
        for pool, name in self.cfg.group_names.items():
            for i, g in enumerate(specs):
                if g.get("groupName") == name:
                    replicas = int(g.get("replicas", g.get("minReplicas", 0)) or 0)
                    out[pool] = GroupReplicas(i, replicas, int(g.get("minReplicas", 0) or 0),
                                              int(g.get("maxReplicas", 2**31 - 1) or 0))
        return out

    async def replicas(self) -> dict[str, GroupReplicas]:
        """The groups as they are now."""
        try:
            return self.groups(await self._get())
        except (ApiException, Urllib3Error) as exc:
            raise KubeError(f"cannot read RayCluster {self.cfg.namespace}/"
                            f"{self.cfg.raycluster}: {_describe(exc)}") from exc

    async def idle_pods(self, pool: str, busy: set[str]) -> list[str]:
        """The pods of a pool's group that host none of the `busy` workers' hosts (pod names)
        and are not being deleted already, by name."""
        group = self.cfg.group_names[pool]
        labels = {"ray.io/cluster": self.cfg.raycluster, "ray.io/group": group}
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        try:
            pods = await asyncio.to_thread(self.core.list_namespaced_pod, self.cfg.namespace,
                                           label_selector=selector)
        except (ApiException, Urllib3Error) as exc:
            raise KubeError(f"cannot list the pods of group {group}: {_describe(exc)}") from exc
        return sorted(
            p.metadata.name for p in pods.items
            if all((p.metadata.labels or {}).get(k) == v for k, v in labels.items())
            and p.metadata.deletion_timestamp is None and p.metadata.name not in busy)

    async def scale(self, sizes: dict[str, int], remove: dict[str, list[str]] | None = None
                    ) -> dict[str, int]:
        """Set the replicas of the pools' groups; returns what the RayCluster holds after.
        A group that shrinks is told which pods to remove when `remove` names them.

        A size outside the group's [minReplicas, maxReplicas] is clamped (KubeRay would).
        Retriable rejections are tried again (re-reading first) up to `patch_attempts` times;
        then, or at once for other errors, KubeError.
        """
        last: Exception | None = None
        for attempt in range(self.cfg.patch_attempts):
            if attempt:
                await self._sleep(self.cfg.retry_backoff_s * attempt)
            try:
                groups = self.groups(await self._get())
                missing = set(sizes) - set(groups)
                if missing:
                    raise KubeError(f"RayCluster {self.cfg.namespace}/{self.cfg.raycluster} has "
                                    f"no worker group for {sorted(missing)} (group_names: "
                                    f"{self.cfg.group_names})")
                ops: list[dict] = []
                applied: dict[str, int] = {}
                for pool, n in sizes.items():
                    g = groups[pool]
                    want = max(g.min_replicas, min(g.max_replicas, n))
                    if want != n:
                        log.warning("%s: %d replicas clamped to the group's [%d, %d]",
                                    pool, n, g.min_replicas, g.max_replicas)
                    applied[pool] = want
                    if want != g.replicas:
                        base = f"/spec/workerGroupSpecs/{g.index}"
                        ops += [{"op": "test", "path": f"{base}/groupName",
                                 "value": self.cfg.group_names[pool]},
                                {"op": "add", "path": f"{base}/replicas", "value": want}]
                        if want < g.replicas and (names := (remove or {}).get(pool)):
                            ops.append({"op": "add", "path": f"{base}/scaleStrategy", "value": {
                                "workersToDelete": names[:g.replicas - want]}})
                if ops:
                    await asyncio.to_thread(
                        self.api.patch_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                        self.cfg.namespace, RAY_PLURAL, self.cfg.raycluster, ops,
                        _content_type="application/json-patch+json")
                    log.info("RayCluster %s/%s scaled: %s", self.cfg.namespace,
                             self.cfg.raycluster, applied)
                return applied
            except ApiException as exc:
                last = exc
                if exc.status not in RETRIABLE:
                    break
                log.warning("RayCluster patch rejected (%s), attempt %d/%d", _describe(exc),
                            attempt + 1, self.cfg.patch_attempts)
            except Urllib3Error as exc:
                last = exc
                log.warning("RayCluster patch failed (%s), attempt %d/%d", _describe(exc),
                            attempt + 1, self.cfg.patch_attempts)
        assert last is not None
        raise KubeError(f"cannot scale RayCluster {self.cfg.namespace}/{self.cfg.raycluster} "
                        f"to {sizes}: {_describe(last)}") from last


def _now_utc() -> datetime:
    return datetime.now(timezone.utc)


class LeaseElector:
    """One `try_acquire_or_renew()` per planner step; `is_leader` holds until the lease would
    expire on our own clock without a renewal."""

    def __init__(self, api: k8s.ApiClient, cfg: KubeConfig, identity: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = k8s.CoordinationV1Api(api)
        self.cfg = cfg
        self.identity = identity
        self.clock = clock
        self._renewed_at: float | None = None  # our clock, last successful acquire/renew
        self._observed: tuple | None = None  # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0  # our clock, when _observed last changed

    @property
    def is_leader(self) -> bool:
        return (self._renewed_at is not None
                and self.clock() - self._renewed_at < self.cfg.lease_duration_s)

    def _spec(self, acquire: datetime, transitions: int) -> k8s.V1LeaseSpec:
        return k8s.V1LeaseSpec(holder_identity=self.identity, acquire_time=acquire,
                               renew_time=_now_utc(), lease_transitions=transitions,
                               lease_duration_seconds=self.cfg.lease_duration_s)

    async def _call(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    async def try_acquire_or_renew(self) -> bool:
        """Acquire, renew or observe the lease; True when we lead after this call."""
        ns, name = self.cfg.namespace, self.cfg.lease_name
        now = self.clock()
        try:
            lease = await self._call(self.api.read_namespaced_lease, name, ns)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot read Lease %s/%s: %s", ns, name, _describe(exc))
                return self.is_leader
            body = k8s.V1Lease(metadata=k8s.V1ObjectMeta(name=name, namespace=ns),
                               spec=self._spec(_now_utc(), 0))
            try:
                await self._call(self.api.create_namespaced_lease, ns, body)
            except ApiException as exc2:
                log.info("Lease %s/%s not created (%s): another planner was first", ns, name,
                         _describe(exc2))
                self._renewed_at = None
                return False
            self._won(now, "acquired new lease")
            return True
        except Urllib3Error as exc:
            log.warning("cannot reach the API server for Lease %s/%s: %s", ns, name, exc)
            return self.is_leader

        spec = lease.spec or k8s.V1LeaseSpec()
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = spec.lease_duration_seconds or self.cfg.lease_duration_s
        holder = spec.holder_identity or ""
        mine = holder == self.identity
        expired = not holder or now - self._observed_at >= duration
        if not mine and not expired:
            self._renewed_at = None
            return False
        transitions = int(spec.lease_transitions or 0)
        if mine:
            lease.spec = self._spec(spec.acquire_time or _now_utc(), transitions)
        else:
            lease.spec = self._spec(_now_utc(), transitions + 1)
        try:
            # carries metadata.resourceVersion as read: a concurrent writer makes this a 409
            await self._call(self.api.replace_namespaced_lease, name, ns, lease)
        except (ApiException, Urllib3Error) as exc:
            log.info("Lease %s/%s not %s: %s", ns, name, "renewed" if mine else "taken over",
                     _describe(exc))
            if not mine or (isinstance(exc, ApiException) and exc.status == 409):
                self._renewed_at = None  # someone else wrote the lease: step down now
            return self.is_leader
        self._won(now, "renewed lease" if mine else f"took over lease from {holder or 'nobody'}")
        return True

    def _won(self, now: float, what: str) -> None:
        if not self.is_leader:
            log.info("%s: %s %s/%s", self.identity, what, self.cfg.namespace, self.cfg.lease_name)
        self._renewed_at = now

    async def release(self) -> None:
        """Give the lease up (on shutdown) so another planner takes over at once."""
        if not self.is_leader:
            return
        ns, name = self.cfg.namespace, self.cfg.lease_name
        try:
            lease = await self._call(self.api.read_namespaced_lease, name, ns)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                lease.spec.renew_time = _now_utc()
                await self._call(self.api.replace_namespaced_lease, name, ns, lease)
        except (ApiException, Urllib3Error) as exc:
            log.warning("could not release Lease %s/%s: %s", ns, name, _describe(exc))
        self._renewed_at = None
