"""Input hardening on a real cluster: API keys (HTTP 401 / gRPC UNAUTHENTICATED, keys never in
the log), the per-client limit (429 + Retry-After / RESOURCE_EXHAUSTED) on a second gateway with
keys on; body limits on the real HTTP server (413, also for chunked bodies); a bad keys file
stops the gateway with a clear message; and many concurrent streaming clients with zero errors
(the 500-client figure is in docs/benchmarks.md, "Gateway load test")."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

import splitserve_sdk as sdk
from bench.gateway_load import run as load_run
from services import cluster_secret
from services.controller.gateway_process import GatewayProcess
from services.gateway.config import GatewayConfig
from services.ports import free_port
from tests.e2e.test_data_path import MODEL, chat, worker_stats, workers
from tests.support.cluster import TEST_SECRET, RunningCluster

pytestmark = pytest.mark.e2e
KEY_A = "sk-e2e-alpha-5c1f0a9b77"
KEY_B = "sk-e2e-bravo-0e4d2b6c31"
KEY_A2 = "sk-e2e-alpha-two-7d3e91"  # a second key of tenant alpha
HELLO = [{"role": "user", "content": "Hello! What does this module do?"}]
SLOW_CLIENT_S = 3.0  # the guarded gateway's slow_client_timeout_s


@pytest.fixture(scope="module")
def guarded(disagg: RunningCluster, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    """A second gateway on the disagg cluster with API keys of two tenants, one request per
    client, a short slow-client timeout and tenant isolation."""
    run_dir = tmp_path_factory.mktemp("guarded")
    keys = run_dir / "keys"
    keys.write_text(f"# e2e keys\n{KEY_A} alpha\n{KEY_A2} alpha\n{KEY_B} bravo\n")
    gw = GatewayProcess(GatewayConfig(
        model=str(model_dir), served_model_name=MODEL, redis_url=disagg.redis_url,
        port=free_port(), grpc_port=free_port(), api_keys_file=keys,
        api_keys_env="SPLITSERVE_E2E_NO_SUCH_VARIABLE", max_in_flight_per_client=1,
        slow_client_timeout_s=SLOW_CLIENT_S, tenant_isolation=True), run_dir,
        disagg.run_dir / cluster_secret.FILE_NAME)
    gw.start()
    try:
        gw.wait_ready(timeout_s=240)
        yield gw
    finally:
        gw.stop()


def openai_client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def test_api_keys_over_http_and_grpc(disagg: RunningCluster, guarded: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai_client(guarded, "sk-not-one-of-ours").models.list()
    r = httpx.post(f"{guarded.url}/v1/chat/completions", json={"model": MODEL,
                                                               "messages": HELLO}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{guarded.url}/metrics", timeout=10).status_code == 200
    c = openai_client(guarded, KEY_A)
    assert [m.id for m in c.models.list().data] == [MODEL]
    out = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == chat(disagg, HELLO)  # same cluster, same text

    target = f"127.0.0.1:{guarded.cfg.grpc_port}"
    with sdk.Client(target, model=MODEL, retries=0) as anon:
        assert anon.health().serving  # Health stays open
        with pytest.raises(sdk.Unauthenticated):
            anon.chat(HELLO, max_tokens=4)
    with sdk.Client(target, model=MODEL, retries=0, token="sk-not-one-of-ours") as wrong:
        with pytest.raises(sdk.Unauthenticated):
            wrong.models()
    with sdk.Client(target, model=MODEL, retries=0, token=KEY_B) as good:
        assert good.chat(HELLO, max_tokens=24, temperature=0).text == out.choices[0].message.content

    log = (guarded.run_dir / "gateway.log").read_text(errors="replace")
    assert "API keys: on (3 accepted)" in log
    assert KEY_A not in log and KEY_B not in log


def test_per_client_limit(guarded: GatewayProcess) -> None:
    body = {"model": MODEL, "prompt": "Stream for a long while. " * 20, "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    a = {"authorization": f"Bearer {KEY_A}"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{guarded.url}/v1/completions", json=body, headers=a) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            first = next(lines)  # streaming: the one slot of key A is taken
            assert first.startswith("data: {") and '"error"' not in first, first
            r = h.post(f"{guarded.url}/v1/completions", headers=a,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1", (first, r.text)
            assert "this client" in r.json()["error"]["message"]
            with sdk.Client(f"127.0.0.1:{guarded.cfg.grpc_port}", model=MODEL, retries=0,
                            token=KEY_A) as g:
                with pytest.raises(sdk.ResourceExhausted, match="this client"):
                    g.generate("x", max_tokens=2)
            other = openai_client(guarded, KEY_B).completions.create(
                model=MODEL, prompt="x", max_tokens=2)
            assert other.usage.completion_tokens == 2
    deadline = time.monotonic() + 10
    while True:  # the slot frees once the dropped stream is unwound
        r = httpx.post(f"{guarded.url}/v1/completions", headers=a, timeout=30,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_api_keys_on_tokenize_and_the_client_limit(guarded: GatewayProcess) -> None:
    url = guarded.url
    for path, body in [("/v1/chat/completions", {"model": MODEL, "messages": HELLO}),
                       ("/tokenize", {"model": MODEL, "prompt": "Hello"})]:
        r = httpx.post(f"{url}{path}", json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai_client(guarded, "sk-not-one-of-ours").models.list()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "splitserve_gateway_routing_decisions_total" in metrics.text
    out = openai_client(guarded, KEY_A).completions.create(
        model=MODEL, prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5

    body = {"model": MODEL, "prompt": "Stream for a long while. " * 20, "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    a = {"authorization": f"Bearer {KEY_A}"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{url}/v1/completions", json=body, headers=a) as held:
            assert held.status_code == 200
            # Keep the line iterator: a dropped one is collected at once, and closing it
            # closes the connection (the server then aborts the request, freeing the slot).
            lines = held.iter_lines()
            first = next(lines)  # streaming: the one slot of key A is taken
            assert first.startswith("data: {") and '"error"' not in first, first
            r = h.post(f"{url}/v1/completions", headers=a,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert "this client" in r.json()["error"]["message"]
            other = openai_client(guarded, KEY_B).completions.create(
                model=MODEL, prompt="x", max_tokens=2)
            assert other.usage.completion_tokens == 2
            assert next(x for x in lines if x).startswith("data: {")  # the held stream goes on
    log = (guarded.run_dir / "gateway.log").read_text(errors="replace")
    assert "API keys: on (3 accepted)" in log and "tenant isolation: on (2 tenants" in log
    assert KEY_A not in log and KEY_B not in log


def _gateway_sample(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def _slot_free(url: str) -> bool:
    """Whether key A may start a request (the fixture allows it one at a time)."""
    r = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {KEY_A}"},
                   json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30)
    assert r.status_code in (200, 429), r.text
    return r.status_code == 200


def test_a_client_that_stops_reading_is_cut(guarded: GatewayProcess,
                                            disagg: RunningCluster) -> None:
    """A streaming client that never reads: once the socket buffers are full and a write has
    waited slow_client_timeout_s, the gateway cuts the response, frees the slot and the
    engines stop generating for it, long before max_tokens."""
    url = guarded.url
    cut_before = _gateway_sample(url, "splitserve_gateway_slow_clients_cut_total")
    # Big events (8 choices, 20 logprobs each) fill the buffers in a few hundred steps.
    body = json.dumps({"model": MODEL, "prompt": "Never read. " * 10, "max_tokens": 1800,
                       "n": 8, "logprobs": 20, "temperature": 1.0, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\n"
                     + f"authorization: Bearer {KEY_A}\r\ncontent-length: {len(body)}\r\n\r\n"
                     .encode() + body)
        t0 = time.monotonic()
        time.sleep(1.0)
        assert not _slot_free(url)  # streaming, unread
        while time.monotonic() - t0 < 120 and not _slot_free(url):
            time.sleep(0.5)
        freed_after = time.monotonic() - t0
        assert _gateway_sample(url, "splitserve_gateway_slow_clients_cut_total") == cut_before + 1
        generated = _gateway_sample(url, "vllm:generation_tokens_total")
        print("freed after", freed_after, "generated", generated)
        # the server closed the connection: what is left in the buffers, then EOF
        sock.settimeout(30)
        tail = b""
        while data := sock.recv(1 << 20):
            tail = data[-16:]
        assert not tail.endswith(b"0\r\n\r\n")  # a truncated chunked body, no clean end
    finally:
        sock.close()
    # the engines stopped: no request left running on any worker
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = [asyncio.run(worker_stats(disagg, w["address"])).num_running_reqs
                   for w in workers(disagg)]
        if not any(running):
            break
        time.sleep(0.2)
    assert not any(running), running


def test_tenants_share_no_prefix_cache(guarded: GatewayProcess) -> None:
    """The same prompt from two tenants: the engine that computes it reports no cached token
    for the second tenant, while a second key of the first tenant hits its cache; the router,
    hashing with the same salts, predicts exactly that (no misprediction)."""
    url = guarded.url
    prompt = "Tenant isolation probe: the quick brown fox jumps over a lazy dog. " * 25
    names = ("splitserve_gateway_route_audited_requests_total",
             "splitserve_gateway_route_reported_cached_tokens_total",
             "splitserve_gateway_route_predicted_cached_tokens_total",
             "splitserve_gateway_route_mispredictions_total")

    def send(key: str) -> dict[str, float]:
        before = {n: _gateway_sample(url, n) for n in names}
        r = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                             "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        return {n.split("_route_")[1].removesuffix("_total"): _gateway_sample(url, n) - v
                for n, v in before.items()}

    first = send(KEY_A)
    assert first["audited_requests"] == 1 and first["reported_cached_tokens"] == 0
    other = send(KEY_B)  # tenant bravo: alpha's blocks are not its blocks
    assert other["audited_requests"] == 1, other
    assert other["reported_cached_tokens"] == 0 and other["predicted_cached_tokens"] == 0, other
    same = send(KEY_A2)  # tenant alpha again, with its other key
    assert same["audited_requests"] == 1, same
    assert same["reported_cached_tokens"] >= 256, same  # the prompt's whole blocks
    assert same["predicted_cached_tokens"] == same["reported_cached_tokens"], same
    assert first["mispredictions"] == other["mispredictions"] == same["mispredictions"] == 0


def test_body_limits_on_the_real_server(disagg: RunningCluster) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode()
    r = httpx.post(f"{disagg.http}/v1/completions", content=big, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for i in range(0, len(big), 64 << 10):
            yield big[i:i + (64 << 10)]
    r = httpx.post(f"{disagg.http}/v1/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{disagg.http}/v1/completions", timeout=30,
                   content=b'{"model": "%s", "prompt": "caf\xe9"}' % MODEL.encode(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert chat(disagg, HELLO)  # and it keeps serving


def test_bad_keys_file_stops_the_gateway(model_dir: Path, tmp_path: Path) -> None:
    cfg = GatewayConfig(model=str(model_dir), redis_url="redis://127.0.0.1:1/0",
                        port=free_port(), api_keys_file=tmp_path / "missing")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster_secret.ENV)}
    argv = [sys.executable, "-m", "services.cli", "gateway", "--config-json",
            cfg.model_dump_json()]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                         env={**env, cluster_secret.ENV: TEST_SECRET.text})
    assert out.returncode != 0
    assert "cannot read the API keys file" in out.stderr and "Traceback" not in out.stderr
    # and a gateway without the cluster secret does not start at all (exit 2, no traceback)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert "needs the cluster secret" in out.stderr and "Traceback" not in out.stderr


def test_concurrent_streaming_clients_without_errors(disagg: RunningCluster) -> None:
    # Streams long enough (128 tokens, seconds each with 100 in one decode batch) that all 100
    # overlap at the gateway even when a loaded machine admits them over a second or two: with
    # 16 tokens a request could end before the last one was admitted, and a CI run peaked at 29.
    ns = argparse.Namespace(url=disagg.http, clients=100, requests=100, isl=8, osl=128, seed=0,
                            model=MODEL, api_key=None, max_seconds=240.0)
    report = asyncio.run(load_run(ns))
    assert report.errors == 0, report.error_samples
    assert report.requests == 100 and report.output_tokens == 100 * 128
    assert report.gateway.peak_in_flight >= 50, report.gateway
    assert report.gateway.fds_peak is None or report.gateway.fds_peak >= 50
    assert sorted(w["role"] for w in workers(disagg)) == ["decode", "prefill"]
