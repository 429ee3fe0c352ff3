"""What the chart renders, per values file: ports, resources, environment, probes, RBAC, commands.

Commands and configurations are checked with the product's own parsers (`splitserve` argparse,
GatewayConfig, PlannerConfig), so the chart cannot drift from the code it runs.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.support.chart import (CHART, NAMESPACE, RELEASE, VALUES_FILES, Manifests, container,
                                 helm, template_args,
                                 env_of, expand, render, render_named)

FULL = f"{RELEASE}-splitserve"
RAY = FULL
GATEWAY_IMAGE_CONTAINERS = ("gateway", "ray-head", "controller", "ray-worker", "planner", "test")



def head_argv(m: Manifests) -> list[str]:
    """`splitserve up ...` as the head pod's controller container runs it, once the head
    container's Ray (KubeRay's `ray start`, blocking, its main process) answers."""
    head = m.get("RayCluster", RAY)["spec"]["headGroupSpec"]["template"]
    ray_head = container(head, "ray-head")
    assert head["spec"]["containers"][0] is ray_head  # KubeRay's Ray container is the first
    assert ray_head["args"] == ['ulimit -n 65536; eval "exec $KUBERAY_GEN_RAY_START_CMD"']
    c = container(head, "controller")
    assert c["command"] == ["/bin/bash", "-c", "--"]
    script = c["args"][0]
    assert "until ray health-check >/dev/null 2>&1; do sleep 2; done" in script
    assert script.index("ray health-check") < script.index("exec splitserve up")
    tail = script[script.index("exec splitserve up"):].replace("\\\n", " ")
    argv = shlex.split(tail)
    assert argv[:2] == ["exec", "splitserve"]
    return argv[2:]


def parse_up(argv: list[str]):
    from services.cli import build_parser

    ns, unknown = build_parser().parse_known_args(argv)
    return ns, [a for a in unknown if a.startswith("--")]


# --- the Ray cluster -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_head_runs_the_controller_against_the_release(name: str) -> None:
    m = render_named(name)
    ns, unknown = parse_up(head_argv(m))
    assert unknown == [], f"flags `splitserve up` does not know: {unknown}"
    # the gateway is its own Deployment; workers advertise their pod IP, serve metrics on the
    # port the ServiceMonitor scrapes, and land on their own worker group by Ray resources
    assert ns.no_gateway and ns.worker_host == "auto" and ns.worker_metrics_port == 9100
    # a deleted or evicted head pod leaves the workers for the next controller to adopt
    assert ns.keep_workers_on_stop
    assert ns.command == "up" and ns.ray_address == "auto"
    assert ns.redis_url == "$SPLITSERVE_REDIS_URL"  # expanded by the shell from the pod's env
    assert ns.mode == "disaggregated"
    groups = m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"]
    replicas = {g["groupName"]: g["replicas"] for g in groups}
    assert (ns.prefill, ns.decode) == (replicas["prefill"], replicas["decode"])
    served = {"default": "splitserve-tiny", "cpu-dev": "splitserve-tiny",
              "gpu-production": "llama-3.1-8b-instruct",
              "external-redis": "qwen2.5-0.5b-instruct"}[name]
    assert ns.served_model_name == served
    model = {"default": "/opt/splitserve/models/splitserve-tiny",
             "cpu-dev": "/opt/splitserve/models/splitserve-tiny",
             "gpu-production": "/models/meta-llama/Llama-3.1-8B-Instruct",
             "external-redis": "Qwen/Qwen2.5-0.5B-Instruct"}[name]
    assert ns.model == model
    assert ns.device == ("cuda" if name == "gpu-production" else "cpu")
    head = m.get("RayCluster", RAY)["spec"]["headGroupSpec"]["template"]
    # the controller joins the head's Ray with its token (docs/security.md, "Ray")
    for name in ("ray-head", "controller"):
        env = env_of(container(head, name))
        assert env["PYTHONHASHSEED"] == "0" and env["RAY_AUTH_MODE"] == "token", name
    # it shares Ray's sockets (/tmp), object store (/dev/shm) and processes (a driver finds
    # its node's raylet among the processes it sees) with the head container
    assert head["spec"]["shareProcessNamespace"] is True
    for path in ("/tmp", "/dev/shm"):
        vols = {next(v["name"] for v in container(head, c)["volumeMounts"]
                     if v["mountPath"] == path) for c in ("ray-head", "controller")}
        assert len(vols) == 1, (path, vols)


def test_the_head_keeps_its_gcs_state_in_redis() -> None:
    """rayCluster.gcsFaultTolerance (KubeRay's gcsFaultToleranceOptions): the chart's Redis by
    default (its password from the same Secret, no credentials or database in the address),
    an external Redis's host and port, an address given, or nothing when turned off."""
    def ft(values: list, *sets: str) -> dict | None:
        spec = render(values, sets).get("RayCluster", RAY)["spec"]
        return spec.get("gcsFaultToleranceOptions")

    assert ft([]) == {"redisAddress": f"redis://{FULL}-redis.{NAMESPACE}.svc:6379",
                      "externalStorageNamespace": RAY}
    assert ft([], "redis.passwordSecret.name=rpw")["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": "rpw", "key": "password"}}}
    external = ft(VALUES_FILES["external-redis"])
    assert external is not None
    assert external["redisAddress"] == "redis://redis-master.data.svc:6379"
    assert external["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": "splitserve-redis", "key": "password"}}}
    given = ft([], "rayCluster.gcsFaultTolerance.redisAddress=redis://gcs.db:6380",
               "rayCluster.gcsFaultTolerance.externalStorageNamespace=ray-a",
               "redis.passwordSecret.name=rpw")
    assert given == {"redisAddress": "redis://gcs.db:6380", "externalStorageNamespace": "ray-a"}
    assert ft([], "rayCluster.gcsFaultTolerance.enabled=false") is None


def test_the_controller_probes_read_its_liveness_file(tmp_path) -> None:
    """The controller container's probes, run by a shell against a file in the role of
    run_dir/controller.alive: not ready and alive while it does not exist (engines load),
    ready and alive while fresh, neither once stale (the controller's loop stopped)."""
    import os
    import subprocess
    import time

    c = container(render_named("default").get("RayCluster", RAY)["spec"]["headGroupSpec"]
                  ["template"], "controller")
    alive = tmp_path / "controller.alive"

    def probe(kind: str) -> bool:
        argv = [a.replace("/tmp/splitserve/controller.alive", str(alive))
                for a in c[kind]["exec"]["command"]]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    assert "rm -f /tmp/splitserve/controller.alive" in c["args"][0]
    from services.controller.cluster import ALIVE_FILE

    assert f"{ns_run_dir(c)}/{ALIVE_FILE}" == "/tmp/splitserve/controller.alive"
    assert (probe("readinessProbe"), probe("livenessProbe")) == (False, True)
    alive.touch()
    assert (probe("readinessProbe"), probe("livenessProbe")) == (True, True)
    old = time.time() - 300
    os.utime(alive, (old, old))
    assert (probe("readinessProbe"), probe("livenessProbe")) == (False, False)


def ns_run_dir(c: dict) -> str:
    script = c["args"][0]
    argv = shlex.split(script[script.index("exec splitserve up"):].replace("\\\n", " "))
    return argv[argv.index("--run-dir") + 1]


def test_pools_are_placed_on_their_worker_groups() -> None:
    m = render_named("gpu-production")
    ns, _ = parse_up(head_argv(m))
    groups = {g["groupName"]: g for g in m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"]}
    for pool, resources in (("prefill", ns.prefill_resources), ("decode", ns.decode_resources)):
        start = groups[pool]["rayStartParams"]
        # KubeRay passes the value to `ray start --resources=` as a quoted JSON string
        declared = json.loads(json.loads(start["resources"]))
        assert resources and set(resources) <= set(declared), (pool, resources, declared)


def test_aggregated_mode_renders_one_group_of_role_both() -> None:
    m = render(VALUES_FILES["cpu-dev"], ("serving.mode=aggregated",))
    groups = m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["both"]
    ns, _ = parse_up(head_argv(m))
    assert ns.mode == "aggregated" and ns.workers == 2
    # the planner sizes the one pool, within the group's bounds
    c = container(m.get("Deployment", "-planner")["spec"]["template"], "planner")
    args = c["args"]
    assert "--prefill-min" not in args and "--decode-min" not in args
    assert (args[args.index("--both-min") + 1], args[args.index("--both-max") + 1]) == (
        str(groups[0]["minReplicas"]), str(groups[0]["maxReplicas"]))


def _up_with_chart_config(m: Manifests, tmp_path, monkeypatch) -> tuple[int, list]:
    """The head's `splitserve up` command with the chart's --config file, as the controller
    parses and checks it (its cluster start-up replaced by a recorder)."""
    import services.controller.cluster as cluster
    from services.cli import main

    head = m.get("RayCluster", RAY)["spec"]["headGroupSpec"]["template"]
    mount = next(v for v in container(head, "controller")["volumeMounts"]
                 if v["name"] == "up-config")
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == "up-config")
    config_map = m.get("ConfigMap", volume["configMap"]["name"])
    argv = head_argv(m)
    path = argv[argv.index("--config") + 1]
    assert path.startswith(mount["mountPath"] + "/")
    local = tmp_path / path.rsplit("/", 1)[1]
    local.write_text(config_map["data"][local.name])
    argv[argv.index("--config") + 1] = str(local)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    argv[argv.index("--model") + 1] = str(model)
    argv[argv.index("--device") + 1] = "cpu"
    seen: list = []
    monkeypatch.setattr(cluster, "run_up", lambda cfg: seen.append(cfg) or 0)
    return main(argv[1:] if argv[0] == "splitserve" else argv), seen


def test_engine_arguments_reach_the_controller_per_pool(tmp_path, monkeypatch) -> None:
    m = render(VALUES_FILES["cpu-dev"], (
        "engine.engineArgs.max_num_batched_tokens=4096",
        "rayCluster.workerGroups.prefill.engineArgs.enable_chunked_prefill=true",
        "rayCluster.workerGroups.decode.engineArgs.max_num_seqs=128"))
    code, seen = _up_with_chart_config(m, tmp_path, monkeypatch)
    assert code == 0
    cfg = seen[0]
    assert cfg.engine.engine_args["max_num_batched_tokens"] == 4096
    assert cfg.prefill.engine_args == {"enable_chunked_prefill": True}
    assert cfg.decode.engine_args == {"max_num_seqs": 128}
    # a changed file rolls the head: its hash is an annotation of the RayCluster
    other = render(VALUES_FILES["cpu-dev"], ("engine.engineArgs.max_num_seqs=8",))
    key = "splitserve.io/up-config"
    assert (m.get("RayCluster", RAY)["metadata"]["annotations"][key]
            != other.get("RayCluster", RAY)["metadata"]["annotations"][key])


def test_a_bad_engine_argument_in_values_stops_the_controller(tmp_path, monkeypatch,
                                                               capsys) -> None:
    m = render(VALUES_FILES["cpu-dev"], ("rayCluster.workerGroups.decode.engineArgs."
                                         "kv_cache_dtype=fp8",))
    code, seen = _up_with_chart_config(m, tmp_path, monkeypatch)
    assert code == 2 and not seen
    assert "kv_cache_dtype" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_worker_groups_place_one_engine_per_pod(name: str) -> None:
    m = render_named(name)
    ray = m.get("RayCluster", RAY)
    assert ray["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert ray["spec"]["enableInTreeAutoscaling"] is False
    head = ray["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "nothing may be scheduled on the head"
    for g in ray["spec"]["workerGroupSpecs"]:
        res = g["rayStartParams"]["resources"]
        # KubeRay puts the value into a shell command: it is a quoted JSON string.
        assert res.startswith('"') and res.endswith('"')
        assert json.loads(json.loads(res)) == {g["groupName"]: 1}
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        spec = g["template"]["spec"]
        c = container(g["template"], "ray-worker")
        assert c["args"] == ['ulimit -n 65536; eval "exec $KUBERAY_GEN_RAY_START_CMD"']
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["worker-metrics"] == 9100 and ports["dashboard-agent"] == 52365
        assert c["readinessProbe"]["httpGet"] == {"path": "/api/local_raylet_healthz",
                                                  "port": "dashboard-agent"}
        assert c["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert g["template"]["metadata"]["labels"]["splitserve/role"] == "worker"


def test_gpu_production_requests_gpus_rdma_and_placement() -> None:
    m = render_named("gpu-production")
    groups = {g["groupName"]: g for g in m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for name, g in groups.items():
        c = container(g["template"], "ray-worker")
        for side in ("requests", "limits"):
            assert c["resources"][side]["nvidia.com/gpu"] == 1
            assert c["resources"][side]["rdma/rdma_shared_device_a"] == 1
        assert c["resources"]["limits"]["memory"] == "96Gi"
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        env = env_of(c)
        assert env["UCX_TLS"] == "rc,sm,cuda_ipc,cuda_copy,tcp"
        assert env["UCX_SOCKADDR_TLS_PRIORITY"] == "tcp"
        spec = g["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        model = next(v for v in spec["volumes"] if v["name"] == "model")
        assert model["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
        assert env["HF_HUB_OFFLINE"] == "1"
    assert "podAffinity" in groups["prefill"]["template"]["spec"]["affinity"]


def test_cpu_dev_requests_no_accelerators() -> None:
    m = render_named("cpu-dev")
    for g in m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"]:
        c = container(g["template"], "ray-worker")
        keys = set(c["resources"]["requests"]) | set(c["resources"]["limits"])
        assert keys == {"cpu", "memory"}
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert "UCX_TLS" not in env_of(c), "on CPU the worker sets its own transports"


# --- the gateway ---------------------------------------------------------------------------------

def gateway_config(m: Manifests):
    from services.gateway.config import GatewayConfig

    c = container(m.get("Deployment", "-gateway")["spec"]["template"], "gateway")
    assert c["command"] == ["splitserve"] and c["args"][:2] == ["gateway", "--config-json"]
    env = env_of(c)
    return GatewayConfig.model_validate_json(expand(c["args"][2], env)), c, env


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_gateway_serves_http_and_grpc_with_probes(name: str) -> None:
    m = render_named(name)
    cfg, c, env = gateway_config(m)
    assert (cfg.host, cfg.port, cfg.grpc_port, cfg.metrics_port) == ("0.0.0.0", 8000, 50051, 9090)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000, "grpc": 50051, "gateway-metrics": 9090}
    # /metrics is only on the metrics port (the API port answers it 404): liveness asks there;
    # startup waits for the API port to open; readiness for live workers behind it
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "gateway-metrics"}
    assert c["startupProbe"] == {"tcpSocket": {"port": "http"}, "periodSeconds": 5,
                                 "timeoutSeconds": 3, "failureThreshold": 60}
    svc = m.get("Service", "-gateway")
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        ("http", 8000, "http"), ("grpc", 50051, "grpc"),
        ("gateway-metrics", 9090, "gateway-metrics")}
    pod_labels = m.get("Deployment", "-gateway")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    # The gateway and the engines agree on the block-hash seed and the Redis key namespace.
    head = head_argv(m)
    assert cfg.namespace == head[head.index("--namespace") + 1]
    assert env["PYTHONHASHSEED"] == "0"
    assert cfg.model == head[head.index("--model") + 1]
    assert cfg.name == head[head.index("--served-model-name") + 1]


def test_gateway_autoscaling_and_disruption_budget() -> None:
    m = render_named("gpu-production")
    dep = m.get("Deployment", "-gateway")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = m.get("HorizontalPodAutoscaler", "-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    pdb = m.get("PodDisruptionBudget", "-gateway")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    dev = render_named("cpu-dev")
    assert not dev.has("HorizontalPodAutoscaler", "-gateway")
    assert dev.get("Deployment", "-gateway")["spec"]["replicas"] == 1


def test_gateway_cuts_slow_clients_and_keeps_route_headers_to_itself() -> None:
    cfg, _, _ = gateway_config(render_named("default"))
    assert cfg.slow_client_timeout_s == 30 and cfg.route_headers is False
    cfg, _, _ = gateway_config(render([], ("gateway.slowClientTimeoutSeconds=5",
                                           "gateway.routeHeaders=true")))
    assert cfg.slow_client_timeout_s == 5 and cfg.route_headers is True


def test_gateway_replica_and_registry_feed() -> None:
    """gateway.indexReplica / gateway.registryFeed: on by default, the gateway's config
    carrying them with their staleness bounds; off, lookups ask Redis and the registry is
    re-read."""
    from router.replica_config import IndexReplicaConfig, RegistryFeedConfig

    cfg, _, _ = gateway_config(render_named("default"))
    assert cfg.index_replica == IndexReplicaConfig() and cfg.registry_feed == RegistryFeedConfig()
    cfg, _, _ = gateway_config(render([], ("gateway.indexReplica.maxStalenessSeconds=3",)))
    assert cfg.index_replica == IndexReplicaConfig(max_staleness_s=3)
    cfg, _, _ = gateway_config(render([], ("gateway.indexReplica.enabled=false",
                                           "gateway.registryFeed.enabled=false")))
    assert cfg.index_replica is None and cfg.registry_feed is None
    bad = helm(*template_args([], ("gateway.indexReplica.maxStalenessSeconds=0",)), check=False)
    assert bad.returncode != 0 and "maxStalenessSeconds" in bad.stderr


def test_gateway_kv_policy_scorer_weights() -> None:
    """serving.kvPolicy.scorerWeights: empty keeps the kv policy's default scorers; set, the
    gateway's config names exactly those (checked by KVPolicyConfig); unknown names are
    refused by the schema."""
    from router.policies import KVPolicyConfig

    default, _, _ = gateway_config(render_named("default"))
    assert default.kv_policy.scorer_weights == KVPolicyConfig().scorer_weights
    cfg, _, _ = gateway_config(render([], ("serving.kvPolicy.scorerWeights.ttft=1",
                                           "serving.kvPolicy.scorerWeights.shared_step=2")))
    assert cfg.kv_policy.scorer_weights == {"ttft": 1.0, "shared_step": 2.0}
    bad = helm(*template_args([], ("serving.kvPolicy.scorerWeights.telepathy=1",)),
               check=False)
    assert bad.returncode != 0 and "invalid propertyName 'telepathy'" in bad.stderr


def test_gateway_runs_vllms_front_end_with_the_engines_arguments() -> None:
    """The gateway config mirrors the engines' shared engine arguments and carries the server
    settings (gateway.frontendArgs), which vLLM's own parser takes."""
    from services.gateway.vllm_frontend import check_frontend_args, server_args

    default, _, _ = gateway_config(render_named("default"))
    assert not default.frontend_args
    cfg, _, _ = gateway_config(render([], (
        "engine.engineArgs.max_num_seqs=64",
        "gateway.frontendArgs.tool_call_parser=hermes",
        "gateway.frontendArgs.enable_auto_tool_choice=true")))
    assert cfg.engine_args == {"max_num_seqs": 64}
    assert cfg.frontend_args == {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}
    check_frontend_args(cfg.frontend_args)
    args = server_args(cfg)
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.max_num_seqs) == (
        "hermes", True, 64)


def test_the_removed_frontend_value_is_refused() -> None:
    """gateway.frontend chose between vLLM's front end and splitserve's own, which is gone:
    a values file that still sets it fails the chart's schema, naming it."""
    from tests.support.chart import helm, template_args

    out = helm(*template_args([], ("gateway.frontend=splitserve",)), check=False)
    assert out.returncode != 0 and "frontend" in out.stderr


def test_gateway_api_keys_come_from_a_secret_file() -> None:
    m = render_named("external-redis")
    _, c, _ = gateway_config(m)
    assert json.loads(c["args"][2])["api_keys_file"] == "/var/run/secrets/splitserve/api-keys/keys"
    vol = next(v for v in m.get("Deployment", "-gateway")["spec"]["template"]["spec"]["volumes"]
               if v["name"] == "api-keys")
    assert vol["secret"]["secretName"] == "splitserve-api-keys"
    assert vol["secret"]["items"] == [{"key": "api-keys", "path": "keys"}]
    assert json.loads(c["args"][2])["max_in_flight_per_client"] == 64


@pytest.mark.parametrize("name", ["default", "gpu-production"])
def test_cluster_secret_reaches_gateway_controller_and_workers_as_a_file(name: str) -> None:
    """Every container that talks to workers, or is one, reads the cluster secret from one
    Secret mounted as a file (docs/security.md); the chart generates that Secret."""
    import base64

    from services.cluster_secret import FILE_ENV, ClusterSecret

    def secret_users(m: Manifests) -> dict[str, str]:
        """owner/container -> the Secret its cluster-secret volume mounts."""
        out = {}
        for owner, tpl in m.pod_templates():
            spec = tpl["spec"]
            for c in spec["containers"]:
                if c["name"] not in ("gateway", "controller", "ray-worker"):
                    continue
                path = env_of(c)[FILE_ENV]
                mount = next(v for v in c["volumeMounts"] if v["name"] == "cluster-secret")
                assert mount["readOnly"] and path.startswith(mount["mountPath"] + "/")
                vol = next(v for v in spec["volumes"] if v["name"] == "cluster-secret")
                key = path.rsplit("/", 1)[1]
                assert vol["secret"]["items"] == [{"key": "cluster-secret", "path": key}]
                assert vol["secret"]["defaultMode"] == 0o440
                assert "SPLITSERVE_CLUSTER_SECRET" not in env_of(c)  # never the value itself
                out[f"{owner}/{c['name']}"] = vol["secret"]["secretName"]
        return out

    m = render_named(name)
    users = secret_users(m)
    kinds = {k.rsplit("/", 1)[1] for k in users}
    assert kinds == {"gateway", "controller", "ray-worker"}, users
    assert set(users.values()) == {f"{FULL}-cluster-secret"}
    generated = m.get("Secret", "-cluster-secret")
    assert generated["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    value = base64.b64decode(generated["data"]["cluster-secret"]).decode()
    assert len(value) == 48 and ClusterSecret.from_text(value).grpc_token
    # the operator's own Secret: used everywhere, none generated
    own = render(VALUES_FILES[name], ("clusterSecret.existingSecret=ops-cluster-secret",))
    assert set(secret_users(own).values()) == {"ops-cluster-secret"}
    assert not own.has("Secret", "-cluster-secret")


@pytest.mark.parametrize("name", ["default", "gpu-production"])
def test_ray_token_reaches_the_head_and_every_worker_group_as_a_file(name: str) -> None:
    """Ray's token authentication: RAY_AUTH_MODE=token and the token from a mounted Secret
    (RAY_AUTH_TOKEN_PATH) in every Ray container (KubeRay copies the worker container's env
    and mounts into its wait-gcs-ready init container); nothing else connects to Ray."""
    import base64

    def ray_auth(m: Manifests, key: str = "auth_token") -> dict[str, str | None]:
        """owner/container -> the Secret its Ray token comes from (None: authentication off)."""
        out: dict[str, str | None] = {}
        for owner, tpl in m.pod_templates():
            spec = tpl["spec"]
            for c in spec["containers"]:
                env = env_of(c)
                assert "RAY_AUTH_TOKEN" not in env  # never the value itself
                if c["name"] not in ("ray-head", "controller", "ray-worker"):
                    assert not any(k.startswith("RAY_AUTH") for k in env), (owner, c["name"])
                    assert not any(v["name"] == "ray-auth" for v in spec.get("volumes", []))
                    continue
                if env["RAY_AUTH_MODE"] == "disabled":
                    assert "RAY_AUTH_TOKEN_PATH" not in env
                    out[f"{owner}/{c['name']}"] = None
                    continue
                assert env["RAY_AUTH_MODE"] == "token"
                path = env["RAY_AUTH_TOKEN_PATH"]
                mount = next(v for v in c["volumeMounts"] if v["name"] == "ray-auth")
                assert mount["readOnly"] and path == mount["mountPath"] + "/token"
                vol = next(v for v in spec["volumes"] if v["name"] == "ray-auth")
                assert vol["secret"]["items"] == [{"key": key, "path": "token"}]
                assert vol["secret"]["defaultMode"] == 0o440
                out[f"{owner}/{c['name']}"] = vol["secret"]["secretName"]
        return out

    m = render_named(name)
    rc = m.get("RayCluster", RAY)
    assert "authOptions" not in rc["spec"]  # the chart's own env, whatever KubeRay's version
    users = ray_auth(m)
    groups = {g["groupName"] for g in rc["spec"]["workerGroupSpecs"]}
    assert set(users) == {f"RayCluster/{RAY}/head/ray-head",
                          f"RayCluster/{RAY}/head/controller"} | {
        f"RayCluster/{RAY}/{g}/ray-worker" for g in groups}
    assert set(users.values()) == {f"{FULL}-ray-auth"}
    generated = m.get("Secret", "-ray-auth")
    assert generated["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    token = base64.b64decode(generated["data"]["auth_token"]).decode()
    cluster = base64.b64decode(m.get("Secret", "-cluster-secret")["data"]["cluster-secret"])
    assert len(token) == 48 and token.isalnum() and token.encode() != cluster
    # the operator's own Secret: used by every Ray container, none generated
    own = render(VALUES_FILES[name], ("rayCluster.auth.existingSecret=ops-ray-token",
                                      "rayCluster.auth.key=token"))
    assert set(ray_auth(own, key="token").values()) == {"ops-ray-token"}
    assert not own.has("Secret", "-ray-auth")
    # off: disabled everywhere, no token anywhere
    off = render(VALUES_FILES[name], ("rayCluster.auth.enabled=false",))
    assert set(ray_auth(off).values()) == {None} and not off.has("Secret", "-ray-auth")


# --- Redis ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "cpu-dev", "gpu-production"])
def test_internal_redis_is_a_statefulset_the_url_points_at(name: str) -> None:
    m = render_named(name)
    sts = m.get("StatefulSet", "-redis")
    c = container(sts["spec"]["template"], "redis")
    assert c["command"] == ["redis-server"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"redis": 6379}
    assert c["readinessProbe"]["exec"]["command"][-1].startswith("redis-cli -h 127.0.0.1 ping")
    svc = m.get("Service", "-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    _, _, env = gateway_config(m)
    url = env["SPLITSERVE_REDIS_URL"]
    assert url.endswith(f"@{FULL}-redis.{NAMESPACE}.svc:6379/0") or \
        url == f"redis://{FULL}-redis.{NAMESPACE}.svc:6379/0"
    args = c["args"]
    if name == "gpu-production":  # password Secret: requirepass, clients authenticate
        assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
        assert url == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis.{NAMESPACE}.svc:6379/0"
        assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "splitserve-redis",
                                                          "key": "password"}}
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
            "storage": "20Gi"}
        assert args[args.index("--appendonly") + 1] == "yes"
    else:
        assert args[args.index("--protected-mode") + 1] == "no"
        assert "volumeClaimTemplates" not in sts["spec"]


def test_external_redis_replaces_the_statefulset() -> None:
    m = render_named("external-redis")
    assert not m.all("StatefulSet")
    assert not m.has("Service", "-redis")
    _, _, env = gateway_config(m)
    assert env["SPLITSERVE_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis-master.data.svc:6379/0"
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "splitserve-redis",
                                                      "key": "password"}}
    head = container(m.get("RayCluster", RAY)["spec"]["headGroupSpec"]["template"],
                     "controller")
    names = [e["name"] for e in head["env"]]
    # Kubernetes expands $(REDIS_PASSWORD) only from variables defined before it.
    assert names.index("REDIS_PASSWORD") < names.index("SPLITSERVE_REDIS_URL")


@pytest.mark.parametrize("client_auth", [True, False])
def test_redis_tls_reaches_the_server_and_every_client(client_auth: bool, monkeypatch) -> None:
    """redis.tls.secretName: the internal Redis serves TLS only (its probes speak TLS), the URL
    is rediss://, and every container that calls Redis (gateway, controller, workers, planner)
    mounts the Secret and names its files in the variables router/redis_config.py reads."""
    from router.redis_config import RedisClientConfig

    m = render([], ("redis.tls.secretName=redis-tls", f"redis.tls.clientAuth={client_auth}",
                    "planner.enabled=true"))
    c = container(m.get("StatefulSet", "-redis")["spec"]["template"], "redis")
    args = c["args"]
    assert args[args.index("--port") + 1] == "0" and args[args.index("--tls-port") + 1] == "6379"
    assert args[args.index("--tls-auth-clients") + 1] == ("yes" if client_auth else "no")
    mount = "/var/run/secrets/splitserve/redis-tls"
    for flag, file in (("--tls-cert-file", "tls.crt"), ("--tls-key-file", "tls.key"),
                       ("--tls-ca-cert-file", "ca.crt")):
        assert args[args.index(flag) + 1] == f"{mount}/{file}"
    probe = c["readinessProbe"]["exec"]["command"][-1]
    assert "--tls --cacert" in probe and ("--cert" in probe) == client_auth
    mounted = set()
    for owner, tpl in m.pod_templates():
        spec = tpl["spec"]
        for ctr in spec["containers"]:
            if not any(v["name"] == "redis-tls" for v in ctr.get("volumeMounts", [])):
                continue
            mounted.add(ctr["name"])
            vm = next(v for v in ctr["volumeMounts"] if v["name"] == "redis-tls")
            assert vm["mountPath"] == mount and vm["readOnly"]
            vol = next(v for v in spec["volumes"] if v["name"] == "redis-tls")
            assert vol["secret"]["secretName"] == "redis-tls", owner
            env = env_of(ctr)
            if "SPLITSERVE_REDIS_URL" in env:
                assert env["SPLITSERVE_REDIS_URL"].startswith("rediss://"), owner
                for k in list(__import__("os").environ):
                    if k.startswith("SPLITSERVE_REDIS_"):
                        monkeypatch.delenv(k)
                for k, v in env.items():
                    if k.startswith("SPLITSERVE_REDIS_TLS_"):
                        monkeypatch.setenv(k, v)
                cfg = RedisClientConfig()
                assert cfg.tls_ca_file == f"{mount}/ca.crt", owner
                assert cfg.tls_cert_file == (f"{mount}/tls.crt" if client_auth else ""), owner
                assert cfg.tls_key_file == (f"{mount}/tls.key" if client_auth else ""), owner
    # the workers get the variables from the controller (Ray runtime env), the file from here;
    # the head's GCS keeps its state in the same Redis (rayCluster.gcsFaultTolerance)
    assert mounted == {"redis", "gateway", "ray-head", "controller", "ray-worker",
                       "planner"}, mounted
    gcs = env_of(container(m.get("RayCluster", RAY)["spec"]["headGroupSpec"]["template"],
                           "ray-head"))
    assert gcs["RAY_REDIS_CA_CERT"] == f"{mount}/ca.crt"
    assert gcs.get("RAY_REDIS_CLIENT_CERT") == (f"{mount}/tls.crt" if client_auth else None)
    assert gcs.get("RAY_REDIS_CLIENT_KEY") == (f"{mount}/tls.key" if client_auth else None)
    ft = m.get("RayCluster", RAY)["spec"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"rediss://{FULL}-redis.{NAMESPACE}.svc:6379"


def test_redis_tls_needs_a_rediss_url_for_an_external_redis() -> None:
    from tests.support.chart import helm, template_args

    out = helm(*template_args(VALUES_FILES["external-redis"],
                              ("redis.tls.secretName=redis-tls",)), check=False)
    assert out.returncode != 0 and "must be a rediss:// URL" in out.stderr
    m = render(VALUES_FILES["external-redis"], (
        "redis.tls.secretName=redis-tls", "redis.external.url=rediss://redis.data.svc:6380/0"))
    _, _, env = gateway_config(m)
    assert env["SPLITSERVE_REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@redis.data.svc:6380/0"


def test_the_index_can_have_a_redis_cluster_of_its_own(monkeypatch) -> None:
    """redis.index.url: every container that has the cluster's Redis URL (gateway, controller,
    which passes it on to the workers, planner) also gets the index's, with the same password,
    parsed by router/redis_config.py; the registry's URL stays put."""
    from router.redis_config import RedisClientConfig
    from tests.support.chart import helm, template_args

    sets = ("redis.index.url=redis://index.data.svc:7000", "redis.index.cluster=true",
            "planner.enabled=true")
    m = render(VALUES_FILES["external-redis"], sets)
    owners = set()
    for owner, tpl in m.pod_templates():
        for ctr in tpl["spec"]["containers"]:
            env = env_of(ctr)
            if "SPLITSERVE_REDIS_URL" not in env:
                assert "SPLITSERVE_REDIS_INDEX_URL" not in env, owner
                continue
            owners.add(ctr["name"])
            assert env["SPLITSERVE_REDIS_URL"] == \
                "redis://:$(REDIS_PASSWORD)@redis-master.data.svc:6379/0", owner
            assert env["SPLITSERVE_REDIS_INDEX_URL"] == \
                "redis://:$(REDIS_PASSWORD)@index.data.svc:7000", owner
            for k in list(__import__("os").environ):
                if k.startswith("SPLITSERVE_REDIS_"):
                    monkeypatch.delenv(k)
            monkeypatch.setenv("SPLITSERVE_REDIS_INDEX_URL", env["SPLITSERVE_REDIS_INDEX_URL"])
            monkeypatch.setenv("SPLITSERVE_REDIS_INDEX_CLUSTER",
                               env["SPLITSERVE_REDIS_INDEX_CLUSTER"])
            cfg = RedisClientConfig()
            assert cfg.index_cluster is True and cfg.index_url.endswith("@index.data.svc:7000")
    assert {"gateway", "controller", "planner"} <= owners, owners
    _, _, env = gateway_config(render_named("external-redis"))
    assert "SPLITSERVE_REDIS_INDEX_URL" not in env  # default: the index on the cluster's Redis
    out = helm(*template_args(VALUES_FILES["external-redis"], (
        "redis.tls.secretName=redis-tls", "redis.external.url=rediss://redis.data.svc:6380/0",
        "redis.index.url=redis://index.data.svc:7000")), check=False)
    assert out.returncode != 0 and "redis.index.url must be a rediss:// URL" in out.stderr


def test_hub_model_reads_its_token_from_a_file() -> None:
    m = render_named("external-redis")
    for owner, tpl in m.pod_templates():
        if owner.startswith(("Pod/", "Deployment/rel-splitserve-planner")):
            continue
        c = tpl["spec"]["containers"][0]
        env = env_of(c)
        assert "HF_HUB_OFFLINE" not in env, owner
        assert env["HF_TOKEN_PATH"] == "/var/run/secrets/splitserve/hf/token", owner
        assert "HF_TOKEN" not in env, "the token is never an environment variable"
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert vols["hf-token"]["secret"]["secretName"] == "hf-token"
        assert vols["cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache"


# --- the planner and its RBAC ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_planner_rbac_is_least_privilege(name: str) -> None:
    m = render_named(name)
    role = m.get("Role", "-planner")
    rules = sorted((r["apiGroups"], r["resources"], sorted(r["verbs"]),
                    r.get("resourceNames")) for r in role["rules"])
    assert rules == sorted([
        (["ray.io"], ["rayclusters"], ["get", "patch"], [RAY]),
        ([""], ["pods"], ["list"], None),
        (["coordination.k8s.io"], ["leases"], ["get", "update"], [f"{FULL}-planner"]),
        (["coordination.k8s.io"], ["leases"], ["create"], None),
    ])
    assert not m.all("ClusterRole") and not m.all("ClusterRoleBinding")
    binding = m.get("RoleBinding", "-planner")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    sa = m.get("ServiceAccount", "-planner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    spec = m.get("Deployment", "-planner")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is True
    # Nothing else mounts an API token.
    for owner, tpl in m.pod_templates():
        if "planner" not in owner:
            assert tpl["spec"]["automountServiceAccountToken"] is False, owner


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_planner_command_targets_this_raycluster(name: str) -> None:
    pytest.importorskip("services.planner.cli", reason="the planner is not in this checkout")
    from services.cli import build_parser
    from services.planner.cli import config_from_args

    m = render_named(name)
    c = container(m.get("Deployment", "-planner")["spec"]["template"], "planner")
    assert c["command"] == ["splitserve"]
    env = env_of(c)
    env["POD_NAME"] = "planner-pod-0"  # from the downward API
    ns = build_parser().parse_args([expand(a, env) for a in c["args"]])
    cfg = config_from_args(ns)
    assert cfg.kube.enabled and cfg.kube.raycluster == RAY
    assert cfg.kube.namespace == NAMESPACE and cfg.kube.lease_name == f"{FULL}-planner"
    assert cfg.kube.identity == "planner-pod-0"
    assert (cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", 9400)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"planner-metrics": 9400}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "planner-metrics"}
    groups = {g["groupName"]: g for g in m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"]}
    assert (cfg.prefill.min_replicas, cfg.prefill.max_replicas) == (
        groups["prefill"]["minReplicas"], groups["prefill"]["maxReplicas"])
    assert (cfg.decode.min_replicas, cfg.decode.max_replicas) == (
        groups["decode"]["minReplicas"], groups["decode"]["maxReplicas"])
    head = head_argv(m)
    assert cfg.namespace == head[head.index("--namespace") + 1]
    if name == "gpu-production":
        assert (cfg.ttft_p90_ms, cfg.itl_p90_ms) == (800, 40)
        assert cfg.metrics_source == "prometheus"


# --- security, network, monitoring, helm test ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_every_pod_runs_non_root_read_only(name: str) -> None:
    m = render_named(name)
    owners = set()
    for owner, tpl in m.pod_templates():
        owners.add(owner.split("/")[0])
        psc = tpl["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, owner
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        for c in tpl["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, owner
            assert sc["readOnlyRootFilesystem"] is True, owner
            assert sc["privileged"] is False and "ALL" in sc["capabilities"]["drop"], owner
            assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"], owner
            mounts = {v["mountPath"] for v in c.get("volumeMounts", [])}
            if c["name"] in GATEWAY_IMAGE_CONTAINERS:
                assert "/tmp" in mounts, f"{owner}: the read-only image needs a writable /tmp"
    assert {"RayCluster", "Deployment", "Pod"} <= owners


ANYONE = "anyone"


def admitted(m: Manifests, template: dict) -> dict[str, set[int] | str]:
    """Which container ports of a pod each peer may reach under the rendered NetworkPolicies
    (they add up): peer (as JSON, or ANYONE) -> port numbers, or "all" for a rule without
    ports. Named ports resolve against the pod's own container ports, as Kubernetes does."""
    labels = template["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
             for p in c.get("ports", [])}
    out: dict[str, set[int] | str] = {}
    for pol in m.all("NetworkPolicy"):
        spec = pol["spec"]
        if not spec["podSelector"]["matchLabels"].items() <= labels.items():
            continue
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec["ingress"]:
            peers = [json.dumps(p, sort_keys=True) for p in rule.get("from", [])] or [ANYONE]
            ports: set[int] | str = "all"
            if "ports" in rule:
                ports = {p["port"] if isinstance(p["port"], int) else named[p["port"]]
                         for p in rule["ports"] if isinstance(p["port"], int)
                         or p["port"] in named}
            for peer in peers:
                have = out.get(peer, set())
                out[peer] = "all" if "all" in (have, ports) else have | ports  # type: ignore
    return {k: v for k, v in out.items() if v}


def test_network_policies_admit_release_peers_gateway_clients_and_prometheus() -> None:
    m = render_named("gpu-production")
    pols = {p["metadata"]["name"]: p["spec"] for p in m.all("NetworkPolicy")}
    assert set(pols) == {f"{FULL}-internal", f"{FULL}-gateway", f"{FULL}-metrics"}
    release = {"app.kubernetes.io/name": "splitserve", "app.kubernetes.io/instance": RELEASE}
    internal = pols[f"{FULL}-internal"]
    assert internal["podSelector"]["matchLabels"] == release
    assert internal["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    # Every pod of the release is selected by the internal policy (so is default-deny).
    for owner, tpl in m.pod_templates():
        assert release.items() <= tpl["metadata"]["labels"].items(), owner
    peer_release = json.dumps({"podSelector": {"matchLabels": release}}, sort_keys=True)
    prometheus = json.dumps({"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}, sort_keys=True)
    clients = json.dumps({"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}, sort_keys=True)
    # pod -> what Prometheus and the gateway's clients reach (release peers: all). The Ray head's
    # GCS, dashboard / Jobs API and client server: from the release's pods only.
    want = {
        "Deployment/rel-splitserve-gateway": ({9090}, {8000, 50051}),
        "RayCluster/rel-splitserve/head": ({8080}, None),
        "RayCluster/rel-splitserve/prefill": ({9100, 8080}, None),
        "RayCluster/rel-splitserve/decode": ({9100, 8080}, None),
        "Deployment/rel-splitserve-planner": ({9400}, None),
    }
    seen = set()
    for owner, tpl in m.pod_templates():
        got = admitted(m, tpl)
        assert got.pop(peer_release) == "all", owner
        if owner in want:
            metrics, api = want[owner]
            assert got.pop(prometheus) == metrics, owner
            assert got.pop(clients, None) == api, owner
            seen.add(owner)
        assert not got, (owner, got)  # nobody else reaches anything (Redis: release only)
    assert seen == set(want)
    # Defaults: the API is open to anyone (networkPolicy.gatewayFrom empty), the metrics ports
    # to every namespace's pods (monitoring.prometheusNamespace empty): still only those ports.
    default = render_named("default")
    gw_tpl = default.get("Deployment", "-gateway")["spec"]["template"]
    got = admitted(default, gw_tpl)
    assert got[ANYONE] == {8000, 50051}
    assert got[json.dumps({"namespaceSelector": {}})] == {9090}
    assert not render(VALUES_FILES["cpu-dev"], ("networkPolicy.enabled=false",)).all(
        "NetworkPolicy")


def test_gateway_metrics_port_must_differ_from_its_api_ports() -> None:
    from tests.support.chart import helm, template_args

    for sets in (("gateway.metricsPort=8000",), ("gateway.metricsPort=50051",)):
        out = helm(*template_args([], sets), check=False)
        assert out.returncode != 0 and "gateway.metricsPort must differ" in out.stderr


def test_service_monitor_scrapes_named_ports_of_selected_services() -> None:
    m = render_named("gpu-production")
    sm = m.get("ServiceMonitor", FULL)
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = sm["spec"]["selector"]["matchLabels"]
    selected = [s for s in m.all("Service")
                if selector.items() <= s["metadata"].get("labels", {}).items()]
    assert {s["metadata"]["name"] for s in selected} == {
        f"{FULL}-gateway", f"{FULL}-workers", f"{FULL}-planner"}
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
    # the gateway is scraped on its metrics port, the one its config serves /metrics on
    gw_svc = m.get("Service", "-gateway")
    scraped = [p for p in gw_svc["spec"]["ports"]
               if p["name"] in {ep["port"] for ep in sm["spec"]["endpoints"]}]
    assert [p["name"] for p in scraped] == ["gateway-metrics"]
    cfg, c, _ = gateway_config(m)
    target = {p["name"]: p["containerPort"] for p in c["ports"]}[scraped[0]["targetPort"]]
    assert target == cfg.metrics_port == 9090
    workers = m.get("Service", "-workers")
    assert workers["spec"]["clusterIP"] == "None"
    worker_labels = m.get("RayCluster", RAY)["spec"]["workerGroupSpecs"][0]["template"][
        "metadata"]["labels"]
    assert workers["spec"]["selector"].items() <= worker_labels.items()
    head_labels = m.get("RayCluster", RAY)["spec"]["headGroupSpec"]["template"]["metadata"][
        "labels"]
    assert not workers["spec"]["selector"].items() <= head_labels.items()


def _gateway_metric_names() -> set[str]:
    from prometheus_client.exposition import generate_latest

    from services.gateway.metrics import GatewayMetrics

    gm = GatewayMetrics()
    gm.ttft.observe(0.1)
    gm.itl.observe(0.01)
    gm.e2e.observe(1)
    gm.requests.labels("/v1/chat/completions", "200").inc()
    gm.live_workers.labels("decode").set(1)
    gm.routes.labels("kv", "ok").inc()
    text = generate_latest(gm.registry).decode()
    # The worker's own families and the gateway's pool gauges (docs/metrics.md).
    from prometheus_client import CollectorRegistry

    from services.controller.pool_sizes import PoolObservation
    from services.gateway.cluster_metrics import ClusterGauges
    from services.worker.metrics import WorkerMetrics

    ClusterGauges(gm).pools.update({"decode": 1}, {"decode": PoolObservation()}, 1.0)
    # a gateway's replica and registry feed families (gateway.indexReplica / registryFeed)
    from redis.asyncio import Redis

    from router.registry_feed import RegistryFeed
    from router.replica_config import IndexReplicaConfig
    from router.replicated_index import ReplicatedPrefixIndex
    from services.gateway.replica_metrics import ReplicaCollector

    unconnected = Redis(port=1)
    index = ReplicatedPrefixIndex(unconnected, "ns", replica=IndexReplicaConfig())
    index.replica.lag_ms.append(5.0)
    feed = RegistryFeed(unconnected, "ns")
    gm.registry.register(ReplicaCollector(lambda: index, lambda: feed))
    worker = CollectorRegistry()
    WorkerMetrics("w", "decode", "m", registry=worker)
    text = generate_latest(gm.registry).decode() + generate_latest(worker).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _vllm_metric_names() -> set[str]:
    """Metric names vLLM's own code registers (read from its sources: importing vLLM is slow)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")
    assert spec and spec.origin, "vLLM is installed by scripts/install.sh"
    root = Path(spec.origin).parent
    names = set()
    for sub in ("v1/metrics", "distributed/kv_transfer/kv_connector/v1/nixl"):
        for f in (root / sub).rglob("*.py"):
            names |= set(re.findall(r'"(vllm:[a-z_]+)"', f.read_text()))
    return names


def _series_known(series: str, gateway: set[str], vllm: set[str]) -> bool:
    if series.startswith("vllm:"):
        base = re.sub(r"_(bucket|sum|count|total)$", "", series)
        return series in vllm or base in vllm
    return series in gateway or series == "up"


def test_alerts_and_dashboard_use_metrics_that_exist() -> None:
    m = render_named("gpu-production")
    gateway, vllm = _gateway_metric_names(), _vllm_metric_names()
    rule = m.get("PrometheusRule", FULL)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"SplitserveTTFTHigh", "SplitserveITLHigh", "SplitserveErrorRateHigh",
                           "SplitserveNoLiveWorkers", "SplitserveWorkerDown",
                           "SplitserveGatewayDown", "SplitserveRoutingPrecisionLow",
                           "SplitserveRoutingRecallLow", "SplitserveIndexReplicaUnsynced"}
    assert re.search(r"> 1(\.0)?$", alerts["SplitserveTTFTHigh"]["expr"].strip())
    assert "> 0.05" in alerts["SplitserveITLHigh"]["expr"]
    assert "> 0.01" in alerts["SplitserveErrorRateHigh"]["expr"]
    assert "< 0.8\n" in alerts["SplitserveRoutingPrecisionLow"]["expr"]
    assert ">= 20" in alerts["SplitserveRoutingPrecisionLow"]["expr"]
    assert alerts["SplitserveRoutingPrecisionLow"]["for"] == "10m"
    assert "< 0.5\n" in alerts["SplitserveRoutingRecallLow"]["expr"]
    series_re = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
    for name, r in alerts.items():
        used = series_re.findall(r["expr"])
        assert used, name
        for s in used:
            assert _series_known(s, gateway, vllm), f"{name}: unknown series {s}"
        assert f'namespace="{NAMESPACE}"' in r["expr"], name
    cm = m.get("ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(cm["data"]["splitserve.json"])
    assert board == json.loads((CHART / "dashboards" / "splitserve.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {s for e in exprs for s in series_re.findall(e)}
    unknown = {s for s in used if not _series_known(s, gateway, vllm)}
    assert not unknown, f"dashboard queries unknown series: {unknown}"
    for must in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:prefix_cache_hits_total",
                 "vllm:prefix_cache_queries_total",
                 "splitserve_gateway_time_to_first_token_seconds_bucket"):
        assert must in used, must


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_helm_test_pod_lists_models_and_completes(name: str) -> None:
    m = render_named(name)
    pod = m.get("Pod", "-test-completion")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = container({"spec": pod["spec"]}, "test")
    assert c["command"] == ["python", "-c"]
    assert c["args"][0] == (CHART / "files" / "helm_test.py").read_text()
    env = env_of(c)
    svc = m.get("Service", "-gateway")["metadata"]["name"]
    assert env["SPLITSERVE_HTTP"] == f"http://{svc}.{NAMESPACE}.svc:8000"
    assert env["SPLITSERVE_GRPC"] == f"{svc}.{NAMESPACE}.svc:50051"
    cfg, _, _ = gateway_config(m)
    assert env["SPLITSERVE_MODEL"] == cfg.name
    assert ("SPLITSERVE_API_KEYS_FILE" in env) == (name == "external-redis")


def test_every_process_logs_json_and_traces_when_asked() -> None:
    from tests.support.chart import VALUES_FILES as files

    m = render(files["gpu-production"], ("logging.otlpEndpoint=http://otel:4317",))
    ray = m.get("RayCluster", RAY)["spec"]
    pods = [ray["headGroupSpec"]["template"]] + [g["template"] for g in ray["workerGroupSpecs"]]
    pods.append(m.get("Deployment", "-gateway")["spec"]["template"])
    pods.append(m.get("Deployment", "-planner")["spec"]["template"])
    for pod in pods:
        env = env_of(pod["spec"]["containers"][0])
        assert env["SPLITSERVE_LOG_FORMAT"] == "json", pod["metadata"]
        assert env["SPLITSERVE_TRACING_OTLP_ENDPOINT"] == "http://otel:4317"
    plain = render_named("gpu-production")
    env = env_of(plain.get("Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert "SPLITSERVE_TRACING_OTLP_ENDPOINT" not in env  # tracing off unless asked
