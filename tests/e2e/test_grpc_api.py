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

import openai
import pytest

import splitserve_sdk as sdk
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


def gateway_observations(cluster: RunningCluster, histogram: str) -> float:
    """How many observations the gateway's histogram holds."""
    return metric(f"{cluster.http}/metrics", f"{histogram}_count")


def test_greedy_chat_over_grpc_equals_http(disagg: RunningCluster) -> None:
    expected = http_chat(disagg, CHAT)
    ttft, itl = ("splitserve_gateway_time_to_first_token_seconds",
                 "splitserve_gateway_inter_token_latency_seconds")
    before = [gateway_observations(disagg, h) for h in (ttft, itl)]
    with grpc_client(disagg) as c:
        chunks = list(c.stream_chat(CHAT, max_tokens=MAX_TOKENS, temperature=0))
        whole = c.chat(CHAT, max_tokens=MAX_TOKENS, temperature=0)
    # the gateway timed both calls: a first token each, and the gaps between later steps
    assert gateway_observations(disagg, ttft) == before[0] + 2
    assert gateway_observations(disagg, itl) - before[1] >= max(1, len(chunks) - 2)
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
