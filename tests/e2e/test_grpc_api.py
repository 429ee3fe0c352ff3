"""The public gRPC API (splitserve.v1.Inference) on a real cluster, through the SDK: the same
text as the OpenAI endpoint, every documented status code, cancellation and deadlines that
abort the request on the workers, and the SDK installed alone in a fresh virtual environment."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

import splitserve_sdk as sdk
from services.cluster_secret import FILE_NAME
from services.controller.gateway_process import GatewayProcess
from services.gateway.config import GatewayConfig
from services.ports import free_port
from tests.e2e.test_data_path import MAX_TOKENS, MODEL, metric, worker_stats, workers
from tests.support.cluster import RunningCluster

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "You are a terse assistant for Python questions."},
        {"role": "user", "content": "How do I read a file line by line in Python?"}]
LONG = "Stream for a long while. " * 20


def http_chat(cluster: RunningCluster, messages: list[dict]) -> str:
    c = openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                  temperature=0)
    return r.choices[0].message.content or ""


def grpc_client(cluster: RunningCluster, **kw) -> sdk.Client:
    assert cluster.grpc, "the cluster does not serve gRPC"
    return sdk.Client(cluster.grpc, model=MODEL, **kw)


def test_ready_line_names_the_grpc_port(disagg: RunningCluster) -> None:
    assert disagg.grpc and disagg.grpc.startswith("127.0.0.1:")
    with grpc_client(disagg) as c:
        assert [m.id for m in c.models()] == [MODEL]
        h = c.health()
        assert h.serving and h.workers.get("prefill") == 1 and h.workers.get("decode") == 1


def gateway_observations(cluster: RunningCluster, histogram: str, route: str) -> float:
    """How many observations the gateway's histogram holds for a route (0 before the first)."""
    try:
        return metric(f"{cluster.http}/metrics", f"{histogram}_count", route=route)
    except AssertionError:
        return 0.0


def test_greedy_chat_over_grpc_equals_http(disagg: RunningCluster) -> None:
    expected = http_chat(disagg, CHAT)
    ttft, itl = ("splitserve_gateway_time_to_first_token_seconds",
                 "splitserve_gateway_inter_token_latency_seconds")
    before = [gateway_observations(disagg, h, "grpc:Chat") for h in (ttft, itl)]
    with grpc_client(disagg) as c:
        chunks = list(c.stream_chat(CHAT, max_tokens=MAX_TOKENS, temperature=0))
        whole = c.chat(CHAT, max_tokens=MAX_TOKENS, temperature=0)
    # the gateway timed both calls: a first token each, and the gaps between later chunks
    assert gateway_observations(disagg, ttft, "grpc:Chat") == before[0] + 2
    assert gateway_observations(disagg, itl, "grpc:Chat") - before[1] >= max(1, len(chunks) - 2)
    assert "".join(ch.text for ch in chunks) == expected == whole.text
    assert len(chunks) > 1 and chunks[-1].finish_reason in ("stop", "length")
    u = chunks[-1].usage
    assert u is not None and u.completion_tokens == len(whole.token_ids)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert len({ch.id for ch in chunks}) == 1


def test_greedy_completion_over_grpc_equals_http(disagg: RunningCluster) -> None:
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    c = openai.OpenAI(base_url=f"{disagg.http}/v1", api_key="unused", max_retries=0)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    with grpc_client(disagg) as g:
        result = g.generate(prompt, max_tokens=MAX_TOKENS, temperature=0)
        by_ids = g.generate([1, 2, 3], max_tokens=4, temperature=0)
    assert result.text == r.choices[0].text
    assert result.usage.completion_tokens == r.usage.completion_tokens
    assert result.usage.prompt_tokens == r.usage.prompt_tokens
    assert by_ids.usage.prompt_tokens == 3


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"temperature": 5.0}, sdk.InvalidArgument, "temperature"),
    ({"max_tokens": 5000}, sdk.InvalidArgument, "cannot be greater than max_model_len"),
    ({"model": "gpt-17"}, sdk.NotFound, "gpt-17"),
])
def test_request_errors(disagg: RunningCluster, kwargs: dict, exc: type, word: str) -> None:
    with grpc_client(disagg) as c:
        with pytest.raises(exc) as info:
            c.chat(CHAT, **kwargs)
    assert word in info.value.message


def test_invalid_prompts(disagg: RunningCluster) -> None:
    with grpc_client(disagg) as c:
        with pytest.raises(sdk.InvalidArgument, match="out of vocabulary"):
            c.generate([1, 2, 999999])
        with pytest.raises(sdk.InvalidArgument, match="maximum context length"):
            c.generate("word " * 3000)
        with pytest.raises(sdk.InvalidArgument, match="empty conversation"):
            c.chat([])


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 5}, "sampling.top_k"), ({"logprobs": 2}, "sampling.logprobs"),
    ({"json_schema": {"type": "object"}}, "sampling.structured_output"),
    ({"tools": [{"name": "f"}]}, "tools"),
])
def test_what_the_splitserve_front_end_does_not_serve_is_refused(
        side_gateways, kwargs: dict, field: str) -> None:
    """Never accepted and ignored: the splitserve front end's pipeline refuses the API's
    fields that only the vLLM front end serves, naming them."""
    target = f"127.0.0.1:{side_gateways['splitserve'].cfg.grpc_port}"
    with sdk.Client(target, model=MODEL, retries=0) as c:
        with pytest.raises(sdk.InvalidArgument) as info:
            c.chat(CHAT, max_tokens=4, **kwargs)
        assert field in info.value.message and "vLLM front end" in info.value.message
        assert c.chat(CHAT, max_tokens=4, temperature=0).finish_reason == "length"


def _wait_aborted(cluster: RunningCluster, addrs: dict[str, str], before: dict) -> dict:
    deadline = time.monotonic() + 20
    while True:
        after = {r: asyncio.run(worker_stats(cluster, a)) for r, a in addrs.items()}
        d, p = after["decode"], after["prefill"]
        done = (d.requests_aborted > before["decode"].requests_aborted and d.in_flight == 0
                and d.num_running_reqs == 0 and p.in_flight == 0 and p.num_running_reqs == 0)
        if done or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


def _stats(cluster: RunningCluster) -> tuple[dict[str, str], dict]:
    addrs = {w["role"]: w["address"] for w in workers(cluster)}
    return addrs, {r: asyncio.run(worker_stats(cluster, a)) for r, a in addrs.items()}


def test_cancelling_the_call_aborts_on_the_workers(disagg: RunningCluster) -> None:
    addrs, before = _stats(disagg)
    with grpc_client(disagg) as c:
        it = c.stream_generate(LONG, max_tokens=1500, temperature=0, ignore_eos=True)
        got = [next(it) for _ in range(5)]
        it.close()  # cancels the call mid-stream
    assert all(ch.finish_reason is None for ch in got)
    after = _wait_aborted(disagg, addrs, before)
    d, p = after["decode"], after["prefill"]
    assert d.requests_aborted == before["decode"].requests_aborted + 1, "decode not aborted"
    assert d.in_flight == 0 and d.num_running_reqs == 0
    assert p.in_flight == 0 and p.num_running_reqs == 0 and p.kv_cache_usage == 0.0
    assert http_chat(disagg, CHAT)  # and the cluster keeps serving


def test_deadline_exceeded_aborts_on_the_workers(disagg: RunningCluster) -> None:
    addrs, before = _stats(disagg)
    with grpc_client(disagg) as c:
        start = time.monotonic()
        with pytest.raises(sdk.DeadlineExceeded):
            c.generate(LONG, max_tokens=1500, temperature=0, ignore_eos=True, timeout=1.5)
        assert time.monotonic() - start < 10
    after = _wait_aborted(disagg, addrs, before)
    assert after["decode"].requests_aborted == before["decode"].requests_aborted + 1
    assert after["decode"].in_flight == 0 and after["prefill"].in_flight == 0


@pytest.fixture(scope="module")
def side_gateways(disagg: RunningCluster, model_dir: Path, tmp_path_factory
                  ) -> Iterator[dict[str, GatewayProcess]]:
    """More gateways on the disagg cluster's Redis: one admitting a single request at a time,
    one with the splitserve front end, and two looking at a namespace without workers (the
    splitserve and the vLLM front end)."""
    run_dir = tmp_path_factory.mktemp("side-gateways")
    secret_file = disagg.run_dir / FILE_NAME
    base = dict(model=str(model_dir), served_model_name=MODEL, redis_url=disagg.redis_url,
                max_model_len=2048)
    gws = {
        "limited": GatewayProcess(GatewayConfig(**base, port=free_port(), grpc_port=free_port(),
                                                max_in_flight=1), run_dir, secret_file),
        "splitserve": GatewayProcess(GatewayConfig(**base, port=free_port(),
                                                   grpc_port=free_port(), frontend="splitserve"),
                                     run_dir / "splitserve", secret_file),
        "empty": GatewayProcess(GatewayConfig(**base, port=free_port(), grpc_port=free_port(),
                                              namespace="splitserve-no-workers",
                                              frontend="splitserve"), run_dir / "empty",
                                secret_file),
        "empty-vllm": GatewayProcess(GatewayConfig(
            **base, port=free_port(), grpc_port=free_port(), namespace="splitserve-no-workers",
            frontend="vllm"), run_dir / "vllm", secret_file),
    }
    for sub in ("vllm", "splitserve", "empty"):
        (run_dir / sub).mkdir()
    try:
        for g in gws.values():
            g.start()
        gws["limited"].wait_ready(timeout_s=120)
        gws["splitserve"].wait_ready(timeout_s=120)
        # not routable, so no HTTP readiness: wait until its gRPC port answers (SDK retries)
        for name in ("empty", "empty-vllm"):
            with sdk.Client(f"127.0.0.1:{gws[name].cfg.grpc_port}", retries=1000,
                            backoff=0.2, max_backoff=1.0) as c:
                c.models(timeout=180)
        yield gws
    finally:
        for g in gws.values():
            g.stop()


def test_resource_exhausted_at_the_admission_limit(side_gateways) -> None:
    target = f"127.0.0.1:{side_gateways['limited'].cfg.grpc_port}"
    with sdk.Client(target, model=MODEL, retries=0) as c:
        it = c.stream_generate(LONG, max_tokens=1500, temperature=0, ignore_eos=True)
        next(it)  # holds the one slot
        with pytest.raises(sdk.ResourceExhausted, match="limit of 1"):
            c.chat(CHAT, max_tokens=4)
        it.close()
        deadline = time.monotonic() + 10
        while True:  # the slot frees once the cancelled call is unwound
            try:
                assert c.chat(CHAT, max_tokens=4).text is not None
                break
            except sdk.ResourceExhausted:
                assert time.monotonic() < deadline
                time.sleep(0.1)


@pytest.mark.parametrize("gateway", ["empty", "empty-vllm"])
def test_unavailable_without_workers(side_gateways, gateway: str) -> None:
    gw = side_gateways[gateway]
    with sdk.Client(f"127.0.0.1:{gw.cfg.grpc_port}", model=MODEL, retries=2,
                    backoff=0.05) as c:
        assert not c.health().serving
        start = time.monotonic()
        with pytest.raises(sdk.Unavailable) as info:
            c.chat(CHAT, max_tokens=4)
        assert info.value.message and time.monotonic() - start < 10


def test_the_vllm_front_end_answers_503_without_workers(side_gateways) -> None:
    """Not vLLM's 500 for a request no engine took: 503 at once, with Retry-After."""
    import httpx

    url = side_gateways["empty-vllm"].url
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": CHAT,
                                                 "max_tokens": 2, "stream": True})):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_workers" and r.headers["retry-after"]
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 200
    # readiness: /health says the gateway has no worker to route to
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["error"]["code"] == "no_workers"


SCRIPT = textwrap.dedent('''
    import sys
    from splitserve_sdk import Client
    with Client(sys.argv[1], timeout=120) as client:
        chunks = client.stream_chat([{"role": "system", "content": sys.argv[2]},
                                     {"role": "user", "content": sys.argv[3]}],
                                    max_tokens=int(sys.argv[4]), temperature=0)
        sys.stdout.write("".join(chunk.text for chunk in chunks))
''')


def test_sdk_alone_in_a_fresh_venv_streams_the_same_chat(disagg: RunningCluster,
                                                         tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    src = tmp_path / "sdk"  # a copy: building must not write into the repository
    shutil.copytree(REPO / "sdk", src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], check=True, timeout=600,
                   env=env)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], check=True,
                            capture_output=True, text=True, env=env).stdout
    names = {line.split("==")[0].lower().replace("_", "-") for line in listed.split()}
    assert {"splitserve-sdk", "grpcio", "protobuf"} <= names
    # only the SDK, its two dependencies (and theirs), and the venv's own tools
    assert names <= {"splitserve-sdk", "grpcio", "protobuf", "typing-extensions", "pip",
                     "setuptools", "wheel"}, names
    script = tmp_path / "stream_chat.py"
    script.write_text(SCRIPT)
    out = subprocess.run([str(py), str(script), disagg.grpc, CHAT[0]["content"],
                          CHAT[1]["content"], str(MAX_TOKENS)], check=True, capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.stdout == http_chat(disagg, CHAT)
