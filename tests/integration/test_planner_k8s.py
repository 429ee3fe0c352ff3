"""The planner against a Kubernetes API emulator over real HTTP (kmock), the real `kubernetes`
client (loaded from a kubeconfig file), a real Redis, and worker metrics it scrapes over HTTP.

Each fake worker is a prometheus_client registry with vLLM's metric names, served on a free
loopback port and registered in the Redis registry, so the planner goes through its real
scrape path. The test plays the controller's part of the Redis contract (publishing what it
observes) since no Ray cluster runs here; tests/e2e covers the real controller.

kmock stores objects and applies merge and JSON patches but has no optimistic concurrency and
no PUT; `ApiServer` adds what a real API server does there: `metadata.resourceVersion` bumped on
every write, 409 Conflict for a write carrying a stale one, PUT as replace, 422 for a JSON patch
whose `test` fails — and `reject()`, which refuses the next writes before they change anything
(as an admission webhook or an overloaded API server would).
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp.web
import httpx
import jsonpatch
import kmock
import pytest
import redis.asyncio as aioredis
import yaml
from kmock._internal import enums, k8s as kmock_k8s
from prometheus_client import CollectorRegistry, Counter, Histogram

from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.controller.pool_sizes import PoolObservation, PoolSizes
from services.planner import Planner, PlannerConfig
from services.planner.config import KubeConfig, PoolLimits
from services.planner.kube import LeaseElector, RayClusterScaler, api_client
from services.ports import free_port

NS = "plantest"
KNS = "serving"
RAYCLUSTERS = kmock.resource("ray.io", "v1", "rayclusters")
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
PODS = kmock.resource("", "v1", "pods")


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus resourceVersion concurrency, PUT, JSON-patch test failures, and
    injected rejections."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.rv = 0
        self.pending_rejections: list[tuple[str, int]] = []  # (plural, status)
        self.rejected: list[tuple[str, int]] = []

    def reject(self, plural: str, status: int, times: int = 1) -> None:
        """Refuse the next `times` writes to `plural` with `status`, changing nothing."""
        self.pending_rejections += [(plural, status)] * times

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    async def _handle(self, request):  # type: ignore[override]
        res = request.resource
        write = request.method in (enums.method.PATCH, enums.method.PUT, enums.method.POST)
        if res is not None and write:
            for i, (plural, status) in enumerate(self.pending_rejections):
                if plural == res.plural:
                    del self.pending_rejections[i]
                    self.rejected.append((plural, status))
                    raise kmock_k8s.KubernetesError(status=status, reason="Injected",
                                                    message="rejected by the test")
            key = (res, request.namespace, request.name)
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta["resourceVersion"] = self._bump()
                meta.setdefault("uid", f"uid-{self.rv}")
            elif request.name is not None and request.method in (enums.method.PATCH,
                                                                 enums.method.PUT):
                async with self._lock:
                    if key not in self.objects or self.objects[key].deleted:
                        raise kmock_k8s.KubernetesObjectNotFoundError()
                    current = copy.deepcopy(self.objects[key].raw)
                    data = request.data
                    have = current.get("metadata", {}).get("resourceVersion")
                    if isinstance(data, dict):
                        sent = data.get("metadata", {}).get("resourceVersion")
                        if sent and sent != have:
                            raise kmock_k8s.KubernetesError(
                                status=409, reason="Conflict",
                                message="the object has been modified; please apply your "
                                        "changes to the latest version and try again")
                        data.setdefault("metadata", {})["resourceVersion"] = self._bump()
                        if request.method == enums.method.PUT:  # replace, not merge
                            self.objects[key].history.append(None)
                            self.objects[key].create(data)
                            return aiohttp.web.json_response(self.objects[key].raw)
                    elif isinstance(data, list):
                        try:
                            jsonpatch.apply_patch(current, data)
                        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                            raise kmock_k8s.KubernetesError(status=422, reason="Invalid",
                                                            message=str(e))
                        data.append({"op": "replace", "path": "/metadata/resourceVersion",
                                     "value": self._bump()})
        return await super()._handle(request)

    def writes(self, plural: str) -> list:
        """PATCH/PUT requests that reached `plural` (including rejected ones)."""
        return [r for r in self  # the handler iterates over the requests it served
                if r.resource is not None and r.resource.plural == plural
                and r.method in (enums.method.PATCH, enums.method.PUT)]


@pytest.fixture
async def api() -> AsyncIterator[tuple[ApiServer, str]]:
    async with ApiServer() as handler, kmock.Server(handler) as server:
        handler.objects[RAYCLUSTERS, KNS, "splitserve"] = {
            "apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "splitserve", "namespace": KNS, "resourceVersion": "0"},
            "spec": {"headGroupSpec": {"rayStartParams": {}},
                     "workerGroupSpecs": [
                         {"groupName": "decode", "replicas": 1, "minReplicas": 0,
                          "maxReplicas": 8},
                         {"groupName": "prefill", "replicas": 1, "minReplicas": 0,
                          "maxReplicas": 8}]}}
        handler.resources[LEASES] = kmock.ResourceInfo(kind="Lease", namespaced=True)
        handler.resources[PODS] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        yield handler, str(server.url).rstrip("/")


def add_pod(handler: ApiServer, name: str, group: str) -> None:
    """A worker pod of the RayCluster's group, labelled as KubeRay labels them."""
    handler.objects[PODS, KNS, name] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": KNS, "resourceVersion": "0",
                     "labels": {"ray.io/cluster": "splitserve", "ray.io/group": group,
                                "ray.io/node-type": "worker"}},
        "spec": {"containers": [{"name": "ray-worker", "image": "x"}]}}


class Clock:
    """The planners' monotonic clock, moved by the test (cool-downs, lease expiry)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeWorker:
    """vLLM's latency metrics on a real HTTP endpoint, registered as a worker in Redis."""

    def __init__(self, worker_id: str, role: WorkerRole, node: str = "") -> None:
        self.reg = CollectorRegistry()
        labels = ["engine", "model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", labels,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=self.reg)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "ITL", labels,
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5), registry=self.reg)
        self.tokens = Counter("vllm:prompt_tokens_by_source", "prompt tokens",
                              labels + ["source"], registry=self.reg)
        self.port = free_port()
        from prometheus_client import start_http_server
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.reg)
        self.info = WorkerInfo(worker_id=worker_id, role=role, address="127.0.0.1:1",
                               model="tiny", metrics_url=f"http://127.0.0.1:{self.port}/metrics",
                               started_at=time.time(), node=node)

    def observe(self, ttft: list[float] = (), itl: list[float] = (), tokens: float = 0) -> None:
        for v in ttft:
            self.ttft.labels("0", "tiny").observe(v)
        for v in itl:
            self.itl.labels("0", "tiny").observe(v)
        self.tokens.labels("0", "tiny", "local_compute").inc(tokens)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def workers() -> Iterator[list[FakeWorker]]:
    made: list[FakeWorker] = []
    yield made
    for w in made:
        w.close()


async def add_worker(r: aioredis.Redis, made: list[FakeWorker], wid: str,
                     role: WorkerRole, node: str = "") -> FakeWorker:
    w = FakeWorker(wid, role, node)
    made.append(w)
    await WorkerRegistry(r, NS, ttl_s=120).register(w.info)
    return w


async def controller_sees(r: aioredis.Redis, **pools: tuple[int, int, int]) -> None:
    """Publish what a controller would: pool -> (serving, starting, draining)."""
    await PoolSizes(r, NS).publish_observed({
        p: PoolObservation(serving=s, starting=st, draining=d) for p, (s, st, d) in pools.items()})


def kubeconfig(tmp_path: Path, url: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": url}}],
        "users": [{"name": "planner", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "planner",
                                                 "namespace": KNS}}]}))
    return str(path)


def make_planner(r: aioredis.Redis, redis_url: str, kcfg: str, clock: Clock, identity: str,
                 **overrides) -> Planner:
    kube = KubeConfig(enabled=True, kubeconfig=kcfg, namespace=KNS, raycluster="splitserve",
                      lease_duration_s=10, identity=identity, patch_attempts=2,
                      retry_backoff_s=0.01)
    settings = dict(redis_url=redis_url, namespace=NS, ttft_p90_ms=500, itl_p90_ms=100,
                    window_s=120, cooldown_up_s=0, cooldown_down_s=60, kube=kube,
                    prefill=PoolLimits(min_replicas=1, max_replicas=6),
                    decode=PoolLimits(min_replicas=1, max_replicas=6))
    settings.update(overrides)
    cfg = PlannerConfig(**settings)
    client = api_client(kube, user_agent=f"splitserve-planner/{identity}")
    return Planner(cfg, r, scaler=RayClusterScaler(client, kube),
                   elector=LeaseElector(client, kube, identity, clock=clock), clock=clock,
                   identity=identity)


def group_replicas(handler: ApiServer) -> dict[str, int]:
    spec = handler.objects[RAYCLUSTERS, KNS, "splitserve"]["spec"]
    return {g["groupName"]: g["replicas"] for g in spec["workerGroupSpecs"]}


async def desired(r: aioredis.Redis) -> dict[str, int]:
    return await PoolSizes(r, NS).desired()


async def test_ttft_breach_scales_prefill_up(api, r, redis_srv, workers, tmp_path) -> None:
    handler, url = api
    await PoolSizes(r, NS).set_desired({"prefill": 1, "decode": 1}, by="controller")
    await controller_sees(r, prefill=(1, 0, 0), decode=(1, 0, 0))
    pre = await add_worker(r, workers, "prefill-0", WorkerRole.PREFILL)
    dec = await add_worker(r, workers, "decode-0", WorkerRole.DECODE)
    dec.observe(itl=[0.02] * 50)
    pre.observe(ttft=[0.2] * 10)  # within the SLO
    planner = make_planner(r, redis_srv.url, kubeconfig(tmp_path, url), Clock(), "p-a")
    try:
        report = await planner.step()
        assert report.leader and not report.errors
        assert report.decisions["prefill"].direction == "hold"
        assert group_replicas(handler) == {"decode": 1, "prefill": 1}
        assert handler.writes("rayclusters") == []

        pre.observe(ttft=[1.5] * 90, tokens=10)  # p90 now ~2 s against 0.5 s
        report = await planner.step()
        sig = report.signals["prefill"]
        assert sig.ttft_p90_s is not None and sig.ttft_p90_s > 1.0
        assert sig.prompt_tokens_per_s is not None and sig.prompt_tokens_per_s > 0
        d = report.decisions["prefill"]
        # 1 serving x min(p90/target, max_scale_up_factor 2) = 2
        assert (d.direction, d.reason, d.target) == ("up", "ttft", 2)
        assert report.decisions["decode"].direction == "hold"
        assert group_replicas(handler) == {"decode": 1, "prefill": 2}
        assert await desired(r) == {"prefill": 2, "decode": 1}
        events = await r.xrange(f"{NS}:pools:events")
        assert events[-1][1][b"by"] == b"planner/p-a" and events[-1][1][b"prefill"] == b"2"
        # the patch pinned the group by name (JSON patch with a test op)
        patch = handler.writes("rayclusters")[-1].data
        assert {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName",
                "value": "prefill"} in patch
    finally:
        await planner.aclose()


async def test_scale_down_after_cooldown_drains_first(api, r, redis_srv, workers,
                                                      tmp_path) -> None:
    handler, url = api
    handler.objects[RAYCLUSTERS, KNS, "splitserve"].patch(
        [{"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 3}])
    await PoolSizes(r, NS).set_desired({"prefill": 1, "decode": 3}, by="controller")
    await controller_sees(r, prefill=(1, 0, 0), decode=(3, 0, 0))
    await add_worker(r, workers, "prefill-0", WorkerRole.PREFILL)
    for i in range(3):  # each on a pod of its own (its host name)
        add_pod(handler, f"splitserve-decode-worker-{i}", "decode")
        (await add_worker(r, workers, f"decode-{i}", WorkerRole.DECODE,
                          node=f"splitserve-decode-worker-{i}")).observe(
            itl=[0.02] * 20)  # idle cluster, fast tokens: one decode worker would do
    add_pod(handler, "splitserve-prefill-worker-0", "prefill")
    clock = Clock()
    planner = make_planner(r, redis_srv.url, kubeconfig(tmp_path, url), clock, "p-a")
    try:
        report = await planner.step()
        assert report.decisions["decode"].reason == "cooldown_down"
        clock.t += 59
        assert (await planner.step()).decisions["decode"].reason == "cooldown_down"
        assert await desired(r) == {"prefill": 1, "decode": 3}
        clock.t += 1
        report = await planner.step()
        assert (report.decisions["decode"].direction, report.decisions["decode"].target) == (
            "down", 2)  # one worker at a time, though the estimate says 1
        assert await desired(r) == {"prefill": 1, "decode": 2}
        # Redis first: the controller drains; the RayCluster keeps its pods meanwhile
        assert group_replicas(handler)["decode"] == 3
        await controller_sees(r, prefill=(1, 0, 0), decode=(2, 0, 1))  # draining
        await planner.step()
        assert group_replicas(handler)["decode"] == 3
        await controller_sees(r, prefill=(1, 0, 0), decode=(2, 0, 0))  # drained and gone
        await WorkerRegistry(r, NS).deregister("decode-2")
        report = await planner.step()
        assert group_replicas(handler)["decode"] == 2
        # and KubeRay is told which pod goes: the drained one, not one at random
        group = handler.objects[RAYCLUSTERS, KNS, "splitserve"]["spec"]["workerGroupSpecs"][0]
        assert group["scaleStrategy"] == {"workersToDelete": ["splitserve-decode-worker-2"]}
        assert report.decisions["decode"].reason == "cooldown_down"  # next one waits again
        # a breach stops any further shrinking, whatever the cool-down
        clock.t += 600
        workers[1].observe(itl=[0.3] * 200)
        report = await planner.step()
        assert report.decisions["decode"].direction == "up"
        assert await desired(r) == {"prefill": 1, "decode": 4}
    finally:
        await planner.aclose()


async def test_aggregated_cluster_sizes_its_pool_both(api, r, redis_srv, workers,
                                                     tmp_path) -> None:
    """An aggregated cluster runs one pool, `both`, in a RayCluster of one worker group: the
    planner shrinks it drain-first when idle and grows it on an SLO breach of its own engines
    (which compute first tokens and decode), and leaves the absent prefill/decode pools alone."""
    handler, url = api
    handler.objects[RAYCLUSTERS, KNS, "splitserve"] = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "splitserve", "namespace": KNS, "resourceVersion": "0"},
        "spec": {"headGroupSpec": {"rayStartParams": {}},
                 "workerGroupSpecs": [{"groupName": "both", "replicas": 3, "minReplicas": 1,
                                       "maxReplicas": 8}]}}
    await PoolSizes(r, NS).set_desired({"both": 3}, by="controller")
    await controller_sees(r, both=(3, 0, 0))
    for i in range(3):
        (await add_worker(r, workers, f"both-{i}", WorkerRole.BOTH)).observe(
            ttft=[0.1] * 20, itl=[0.02] * 50)  # idle: one worker would do
    clock = Clock()
    planner = make_planner(r, redis_srv.url, kubeconfig(tmp_path, url), clock, "p-a",
                           both=PoolLimits(min_replicas=1, max_replicas=6))
    try:
        report = await planner.step()
        assert set(report.decisions) == {"both"} and not report.errors
        sig = report.signals["both"]
        assert sig.serving == 3 and sig.ttft_p90_s is not None and sig.itl_p90_s is not None
        assert planner.metrics.itl._value.get() == sig.itl_p90_s  # the cluster's SLO figures
        assert report.decisions["both"].recommended == 1  # clamped to min_replicas
        assert report.decisions["both"].reason == "cooldown_down"
        clock.t += 60
        report = await planner.step()
        assert (report.decisions["both"].direction, report.decisions["both"].target) == (
            "down", 2)
        assert await desired(r) == {"both": 2}
        assert group_replicas(handler) == {"both": 3}  # pods stay until the worker drained
        await controller_sees(r, both=(2, 0, 0))
        await WorkerRegistry(r, NS).deregister("both-2")
        await planner.step()
        assert group_replicas(handler) == {"both": 2}

        clock.t += 600
        workers[0].observe(itl=[0.4] * 300)  # p90 ~0.4 s against 0.1 s
        report = await planner.step()
        d = report.decisions["both"]
        # 2 serving x min(p90/target, max_scale_up_factor 2) = 4
        assert (d.direction, d.reason, d.target) == ("up", "itl", 4)
        assert group_replicas(handler) == {"both": 4}
        assert await desired(r) == {"both": 4}
        assert set(await desired(r)) == {"both"}  # no prefill/decode pool was written
    finally:
        await planner.aclose()


async def test_two_planners_one_leader(api, r, redis_srv, workers, tmp_path) -> None:
    handler, url = api
    kcfg = kubeconfig(tmp_path, url)
    await PoolSizes(r, NS).set_desired({"prefill": 1, "decode": 1}, by="controller")
    await controller_sees(r, prefill=(1, 0, 0), decode=(1, 0, 0))
    pre = await add_worker(r, workers, "prefill-0", WorkerRole.PREFILL)
    await add_worker(r, workers, "decode-0", WorkerRole.DECODE)
    pre.observe(ttft=[3.0] * 50)
    clock = Clock()
    a = make_planner(r, redis_srv.url, kcfg, clock, "p-a")
    b = make_planner(r, redis_srv.url, kcfg, clock, "p-b")
    try:
        ra, rb = await asyncio.gather(a.step(), b.step())  # both race for a missing Lease
        assert [ra.leader, rb.leader].count(True) == 1
        leader, follower = (a, b) if ra.leader else (b, a)
        lease = handler.objects[LEASES, KNS, "splitserve-planner"]
        assert lease["spec"]["holderIdentity"] == leader.identity
        assert lease["spec"]["leaseTransitions"] == 0
        patches = handler.writes("rayclusters")
        assert patches and all(f"/{leader.identity}" in p.headers["User-Agent"] for p in patches)
        assert (await desired(r))["prefill"] == 2
        events = [e[1][b"by"] for e in await r.xrange(f"{NS}:pools:events")]
        assert f"planner/{follower.identity}".encode() not in events

        # the follower keeps observing and writing nothing, even with a reason to scale
        await controller_sees(r, prefill=(2, 0, 0), decode=(1, 0, 0))
        (await add_worker(r, workers, "prefill-1", WorkerRole.PREFILL)).observe(ttft=[3.0] * 50)
        pre.observe(ttft=[3.0] * 200)
        n = len(handler.writes("rayclusters"))
        report = await follower.step()
        assert not report.leader and report.decisions == {}
        assert report.signals["prefill"].ttft_p90_s is not None
        assert len(handler.writes("rayclusters")) == n

        # the leader stops renewing (crashed); after lease_duration_s the follower takes over
        clock.t += 5
        assert not (await follower.step()).leader
        clock.t += 10
        report = await follower.step()
        assert report.leader
        lease = handler.objects[LEASES, KNS, "splitserve-planner"]
        assert lease["spec"]["holderIdentity"] == follower.identity
        assert lease["spec"]["leaseTransitions"] == 1
        assert report.decisions["prefill"].target == 4  # it acts: 2 serving x 2
        assert group_replicas(handler)["prefill"] == 4
        # the old leader comes back: it sees the new holder and does not write
        n = len(handler.writes("rayclusters"))
        report = await leader.step()
        assert not report.leader and len(handler.writes("rayclusters")) == n
    finally:
        await a.aclose()
        await b.aclose()


async def test_rejected_patch_is_retried_not_lost(api, r, redis_srv, workers, tmp_path) -> None:
    handler, url = api
    await PoolSizes(r, NS).set_desired({"prefill": 1, "decode": 1}, by="controller")
    await controller_sees(r, prefill=(1, 0, 0), decode=(1, 0, 0))
    pre = await add_worker(r, workers, "prefill-0", WorkerRole.PREFILL)
    await add_worker(r, workers, "decode-0", WorkerRole.DECODE)
    pre.observe(ttft=[3.0] * 50)
    clock = Clock()
    planner = make_planner(r, redis_srv.url, kubeconfig(tmp_path, url), clock, "p-a",
                           cooldown_up_s=30)
    try:
        # one rejection: the second try within the step lands
        handler.reject("rayclusters", 503)
        report = await planner.step()
        assert not report.errors and handler.rejected == [("rayclusters", 503)]
        assert group_replicas(handler)["prefill"] == 2 and (await desired(r))["prefill"] == 2

        # more rejections than tries in a step: the step reports it, the pool waits for its pods
        await controller_sees(r, prefill=(2, 0, 0), decode=(1, 0, 0))
        (await add_worker(r, workers, "prefill-1", WorkerRole.PREFILL)).observe(ttft=[3.0] * 50)
        pre.observe(ttft=[3.0] * 200)
        clock.t += 30
        handler.reject("rayclusters", 500, times=1)
        handler.reject("rayclusters", 429, times=1)
        report = await planner.step()
        assert report.decisions["prefill"].target == 4 and report.errors
        assert "HTTP 429" in report.errors[0]
        assert group_replicas(handler)["prefill"] == 2
        assert (await desired(r))["prefill"] == 2  # not raised before the pods can come

        # next step: no new decision, yet the kept target is applied
        clock.t += 1
        report = await planner.step()
        assert report.decisions["prefill"].direction == "hold" and not report.errors
        assert group_replicas(handler)["prefill"] == 4
        assert (await desired(r))["prefill"] == 4

        # a non-retriable rejection (403) is not hammered: one try per step
        n = len(handler.writes("rayclusters"))
        handler.objects[RAYCLUSTERS, KNS, "splitserve"].patch(
            [{"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 1}])
        handler.reject("rayclusters", 403)
        report = await planner.step()
        assert "HTTP 403" in report.errors[0] and len(handler.writes("rayclusters")) == n + 1
        await planner.step()
        assert group_replicas(handler)["prefill"] == 4
    finally:
        await planner.aclose()


async def test_planner_metrics_endpoint(api, r, redis_srv, workers, tmp_path) -> None:
    handler, url = api
    await PoolSizes(r, NS).set_desired({"prefill": 1, "decode": 1}, by="controller")
    await controller_sees(r, prefill=(1, 0, 0), decode=(1, 0, 0))
    pre = await add_worker(r, workers, "prefill-0", WorkerRole.PREFILL)
    await add_worker(r, workers, "decode-0", WorkerRole.DECODE)
    pre.observe(ttft=[3.0] * 50)
    planner = make_planner(r, redis_srv.url, kubeconfig(tmp_path, url), Clock(), "p-a")
    port = free_port()
    server, _ = planner.metrics.serve("127.0.0.1", port)
    try:
        await planner.step()
        async with httpx.AsyncClient(trust_env=False) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert 'splitserve_planner_desired_replicas{pool="prefill"} 2.0' in text
        assert "splitserve_planner_is_leader 1.0" in text
        assert ('splitserve_planner_decisions_total{direction="up",pool="prefill",'
                'reason="ttft"} 1.0') in text
        assert "splitserve_planner_observed_ttft_p90_seconds" in text
    finally:
        server.shutdown()
        server.server_close()
        await planner.aclose()
