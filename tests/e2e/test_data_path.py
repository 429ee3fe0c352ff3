"""The whole data path on real components: `splitserve up`, vLLM engines in Ray actors, NIXL
KV transfer, Redis registry, gateway over HTTP, the official openai client."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from tests.support.cluster import RunningCluster, cluster_secret, worker_channel
from tests.support.engine_link import EngineLinks

pytestmark = pytest.mark.e2e
MODEL = "splitserve-tiny"
MAX_TOKENS = 24

COMPLETION_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the module docstring explains",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Operators decide with numbers: latency percentiles, throughput and the error rate of "
    "every request that reached the gateway during the last hour of traffic",
]
CHATS = [
    [{"role": "user", "content": "Hello! What does this module do?"}],
    [{"role": "system", "content": "You are a terse assistant for Python questions."},
     {"role": "user", "content": "How do I read a file line by line in Python?"}],
]


def client(cluster: RunningCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0)


def complete(cluster: RunningCluster, prompt: str) -> str:
    r = client(cluster).completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0)
    return r.choices[0].text


def chat(cluster: RunningCluster, messages: list[dict]) -> str:
    r = client(cluster).chat.completions.create(model=MODEL, messages=messages,
                                                max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content or ""


def workers(cluster: RunningCluster) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                          "--redis-url", cluster.redis_url], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def metric(url: str, name: str, **labels: str) -> float:
    """A counter's value from a worker's Prometheus endpoint."""
    text = httpx.get(url, timeout=10).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in want):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name}{labels} not found at {url}")


async def worker_stats(cluster: RunningCluster, address: str) -> pb.StatsResponse:
    async with worker_channel(cluster_secret(cluster), address) as ch:
        return await pb_grpc.WorkerStub(ch).Stats(pb.StatsRequest(), timeout=10)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, str]:
    """transformers' greedy `generate` on the same model: the ground truth."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[str, str] = {}

    def gen(ids: list[int]) -> str:
        with torch.no_grad():
            seq = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return tok.decode(seq[0, len(ids):], skip_special_tokens=True)

    for p in COMPLETION_PROMPTS:
        out[p] = gen(tok(p)["input_ids"])
    for i, msgs in enumerate(CHATS):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out[f"chat{i}"] = gen(tok(text, add_special_tokens=False)["input_ids"])
    return out


def test_disaggregated_equals_aggregated_equals_transformers(
        disagg: RunningCluster, aggregated: RunningCluster, reference: dict[str, str]) -> None:
    for p in COMPLETION_PROMPTS:
        d, a = complete(disagg, p), complete(aggregated, p)
        assert d == a == reference[p], (p, d, a, reference[p])
    for i, msgs in enumerate(CHATS):
        d, a = chat(disagg, msgs), chat(aggregated, msgs)
        assert d == a == reference[f"chat{i}"], (msgs, d, a)
    assert any(reference.values()), "the model generated nothing at all"


def test_decode_prompt_tokens_arrive_by_kv_transfer(disagg: RunningCluster) -> None:
    ws = workers(disagg)
    decode = next(w for w in ws if w["role"] == "decode")
    prefill = next(w for w in ws if w["role"] == "prefill")
    name = "vllm:prompt_tokens_by_source_total"

    def figures() -> tuple[float, float, float]:
        return (metric(decode["metrics_url"], name, source="external_kv_transfer"),
                metric(decode["metrics_url"], name, source="local_compute"),
                metric(prefill["metrics_url"], name, source="local_compute"))

    before = figures()
    prompt = "A prompt long enough to fill a few KV blocks. " * 12
    r = client(disagg).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    n = r.usage.prompt_tokens
    assert n > 64
    # The counters are updated at the engines' next stats tick.
    deadline = time.monotonic() + 10
    while (after := figures()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    external, local, prefill_local = (a - b for a, b in zip(after, before))
    assert external == n, f"decode got {external} of {n} prompt tokens by KV transfer"
    assert local == 0, f"decode computed {local} prompt tokens itself"
    assert prefill_local == n, "the prefill worker computed the prompt"
    assert metric(decode["metrics_url"], "vllm:nixl_xfer_time_seconds_count") > 0


def test_cached_tokens_are_the_prefill_workers_cache_hits(disagg: RunningCluster,
                                                         model_dir: Path) -> None:
    """usage.prompt_tokens_details.cached_tokens counts prompt tokens no engine computed for the
    request: with a prefill worker, its prefix-cache hits, even when the decode worker has never
    seen the prompt."""
    from transformers import AutoTokenizer

    prompt = f"A fresh prompt ({time.time_ns()}) that no engine has seen before: " + (
        "tokens that fill several KV blocks of thirty-two tokens each. " * 10)
    ws = workers(disagg)
    prefill = next(w for w in ws if w["role"] == "prefill")
    decode = next(w for w in ws if w["role"] == "decode")
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]

    async def prefill_only() -> None:
        """The prompt into the prefill worker's cache only (its blocks then released)."""
        async with EngineLinks(cluster_secret(disagg)) as links:
            kv, _ = await links.prefill(prefill, "seed-cache", ids)
            await links.release(decode, "seed-cache", kv)

    asyncio.run(prefill_only())
    r = httpx.post(f"{disagg.http}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["prompt_tokens"] == len(ids) > 96
    cached = u["prompt_tokens_details"]["cached_tokens"]
    assert cached == (len(ids) - 1) // 32 * 32, (cached, len(ids))


def test_streaming_and_non_streaming_agree(disagg: RunningCluster) -> None:
    c = client(disagg)
    prompt = COMPLETION_PROMPTS[0]
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    parts, usage = [], None
    for ev in c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                   temperature=0, stream=True,
                                   stream_options={"include_usage": True}):
        if ev.choices:
            parts.append(ev.choices[0].text)
        if ev.usage:
            usage = ev.usage
    assert "".join(parts) == full.choices[0].text
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens

    msgs = CHATS[1]
    full_chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS,
                                          temperature=0)
    deltas, finish = [], None
    for ev in c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS,
                                        temperature=0, stream=True):
        deltas.append(ev.choices[0].delta.content or "")
        finish = ev.choices[0].finish_reason or finish
    assert "".join(deltas) == full_chat.choices[0].message.content
    assert finish == full_chat.choices[0].finish_reason


def test_prompt_ending_inside_a_character(disagg: RunningCluster, model_dir: Path) -> None:
    """A token-array prompt that stops half-way through a character. The gateway's front end
    is vLLM's own detokenizer, which answers what vLLM's server answers (it repeats the
    prompt's text first, vllm-project/vllm#48853): the same text whole and streamed, ending
    with the new text of the tokens the engine generates. (A migration never sends such a
    prompt to a detokenizer: the front end's detokenizer keeps its state across workers.)"""
    import tokenizers.decoders
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    emoji = tok.encode("\U0001F642", add_special_tokens=False)
    assert len(emoji) == 4
    prompt = tok("Emoji ahead:")["input_ids"] + emoji[:2]
    decode = next(w for w in workers(disagg) if w["role"] == "decode")

    async def on_worker() -> list[int]:
        async with EngineLinks(cluster_secret(disagg)) as links:
            return await links.generate(decode, "partial-char", prompt, MAX_TOKENS,
                                        ignore_eos=True)

    ids = asyncio.run(on_worker())
    assert len(ids) == MAX_TOKENS
    stream = tokenizers.decoders.DecodeStream(skip_special_tokens=True)
    for t in prompt:  # primed token by token: holds the half character back
        stream.step(tok._tokenizer, t)
    expected = "".join(stream.step(tok._tokenizer, t) or "" for t in ids)
    # through the gateway (prefill and decode pools), streamed and whole
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(f"{disagg.http}/v1/completions", json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["text"].endswith(expected)
    parts = []
    with httpx.stream("POST", f"{disagg.http}/v1/completions", json={**body, "stream": True},
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts += [c["text"] for c in json.loads(line[6:]).get("choices", [])]
    assert "".join(parts) == whole.json()["choices"][0]["text"]


def test_sampling_parameters(disagg: RunningCluster) -> None:
    c = client(disagg)
    prompt = COMPLETION_PROMPTS[2]
    seeded = [c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0,
                                   top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1], "same seed, different output"
    greedy = complete(disagg, prompt)
    stop_word = greedy.split()[2] if len(greedy.split()) > 2 else greedy[3:6]
    stopped = c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                   temperature=0, stop=[stop_word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[:greedy.index(stop_word)]
    # streamed: the gateway holds back what could start the stop string, and sends the rest
    events = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, stop=[stop_word, "\n\n\n"], stream=True))
    assert "".join(e.choices[0].text for e in events if e.choices) == stopped.choices[0].text
    assert events[-1].choices[0].finish_reason == "stop"
    one = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_client_disconnect_aborts_on_both_workers(disagg: RunningCluster) -> None:
    ws = workers(disagg)
    addrs = {w["role"]: w["address"] for w in ws}
    before = {r: asyncio.run(worker_stats(disagg, a)) for r, a in addrs.items()}
    body = {"model": MODEL, "prompt": "Stream for a long while. " * 20, "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{disagg.http}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 5:
                    break  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = {r: asyncio.run(worker_stats(disagg, a)) for r, a in addrs.items()}
        d, p = after["decode"], after["prefill"]
        if (d.requests_aborted > before["decode"].requests_aborted and d.in_flight == 0
                and d.num_running_reqs == 0 and p.in_flight == 0 and p.num_running_reqs == 0
                and p.kv_cache_usage == 0.0):
            break
        time.sleep(0.2)
    d, p = after["decode"], after["prefill"]
    assert d.requests_aborted == before["decode"].requests_aborted + 1, "decode not aborted"
    assert d.in_flight == 0 and d.num_running_reqs == 0 and d.num_waiting_reqs == 0
    assert p.in_flight == 0 and p.num_running_reqs == 0, "prefill still busy"
    assert p.kv_cache_usage == 0.0, "prefill worker still holds KV blocks"
    # far fewer tokens than asked were generated: the engine stopped
    assert complete(disagg, COMPLETION_PROMPTS[0])  # and the cluster keeps serving


BAD_INPUTS = [
    ("/v1/completions", b"{not json", 400, "JSON decode error"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": 42}).encode(), 400, "body.prompt"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "ten"}).encode(),
     400, "body.max_tokens"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": "hot"}).encode(),
     400, "body.temperature"),
    ("/v1/completions", json.dumps({"model": "gpt-17", "prompt": "x"}).encode(), 404,
     "`gpt-17` does not exist"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(),
     400, "max_tokens must be at least 1"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -5}).encode(),
     400, "max_tokens must be at least 1"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "word " * 3000}).encode(), 400,
     "maximum context length"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 5000}).encode(),
     400, "cannot be greater than max_model_len"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2, 999999]}).encode(), 400,
     "out of vocabulary"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400,
     "empty conversation"),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400, "body.messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400,
     "body.messages"),
    ("/v1/chat/completions", json.dumps([1, 2, 3]).encode(), 400, "valid dictionary"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 0}).encode(), 400, "n"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "top_logprobs": 100, "logprobs": True,
                                         "messages": [{"role": "user", "content": "hi"}]}
                                        ).encode(), 400, "greater than max allowed"),
]
"""Bad requests, each with a part of vLLM's own message for it (its server's answers; the
conformance suite, tests/e2e/test_vllm_frontend.py, compares whole answers with it)."""


@pytest.mark.parametrize("path,body,status,message", BAD_INPUTS,
                         ids=[f"{i}-{b[:40]!r}" for i, (_, b, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_openai_error(disagg: RunningCluster, path: str, body: bytes, status: int,
                                     message: str) -> None:
    r = httpx.post(disagg.http + path, content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["type"], str) and err["type"], err
    assert message in err["message"], err


def test_bad_input_through_openai_client(disagg: RunningCluster) -> None:
    c = client(disagg)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 20000}])
    assert "maximum context length" in exc.value.body["message"]
    # nothing crashed: the workers are alive and the cluster serves
    assert {w["role"] for w in workers(disagg)} == {"prefill", "decode"}
    assert chat(disagg, CHATS[0])


def test_models_health_metrics_status(disagg: RunningCluster) -> None:
    models = client(disagg).models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = httpx.get(f"{disagg.http}/health", timeout=10)
    assert h.status_code == 200  # vLLM's server: 200, no body (503 without a live worker)
    text = httpx.get(f"{disagg.http}/metrics", timeout=10).text
    assert re.search(r'splitserve_gateway_routing_decisions_total\{outcome="remote_prefill",'
                     r'policy="kv"\} [1-9]', text), text[:2000]
    ws = workers(disagg)
    assert sorted(w["role"] for w in ws) == ["decode", "prefill"]
    for w in ws:
        assert w["model"] == MODEL and w["address"].startswith("127.0.0.1:")
        assert httpx.get(w["metrics_url"], timeout=10).status_code == 200
    table = subprocess.run([sys.executable, "-m", "services.cli", "status", "--redis-url",
                            disagg.redis_url], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "prefill" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "services.cli", "status", "--redis-url",
                          "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "cannot read the registry" in bad.stderr


def test_each_pool_runs_with_its_own_engine_arguments(disagg: RunningCluster) -> None:
    """`--prefill-engine-arg` / `--decode-engine-arg` reach vLLM untouched: each engine reports
    the KV cache size its pool was given (vLLM's cache_config_info)."""
    from tests.e2e.conftest import DISAGG_KV_BLOCKS

    seen = {}
    for w in workers(disagg):
        text = httpx.get(w["metrics_url"], timeout=10).text
        info = next(line for line in text.splitlines()
                    if line.startswith("vllm:cache_config_info{"))
        seen[w["role"]] = re.search(r'num_gpu_blocks="(\d+)"', info).group(1)
    assert seen == {pool: str(n) for pool, n in DISAGG_KV_BLOCKS.items()}


def test_worker_ports_refuse_callers_without_the_cluster_secret(disagg: RunningCluster) -> None:
    """Worker gRPC and the engine link take nobody without the cluster secret `up`
    generated; with it (the control calls) they serve."""
    import zmq
    import zmq.asyncio
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    from services.cluster_secret import ClusterSecret
    from services.gateway.link_client import LinkClient
    from services.grpc_auth import call_metadata
    from services.link import ADD, LinkKeys

    secret, stranger = cluster_secret(disagg), ClusterSecret.generate()
    decode = next(w for w in workers(disagg) if w["role"] == "decode")
    assert (disagg.run_dir / "cluster-secret").stat().st_mode & 0o777 == 0o600

    def link_request(rid: str) -> EngineCoreRequest:
        return EngineCoreRequest(
            request_id=rid, prompt_token_ids=[5, 6, 7, 8], mm_features=None,
            sampling_params=SamplingParams(max_tokens=2, ignore_eos=True),
            pooling_params=None, arrival_time=time.time(), lora_request=None,
            cache_salt=None, data_parallel_rank=None)

    async def probe() -> None:
        # gRPC: no token, another cluster's token -> UNAUTHENTICATED, nothing served
        async with grpc.aio.insecure_channel(decode["address"]) as ch:
            for metadata in (None, call_metadata(stranger)):
                for call in (pb_grpc.WorkerStub(ch).Stats(pb.StatsRequest(), timeout=10,
                                                          metadata=metadata),
                             pb_grpc.WorkerStub(ch).Health(pb.HealthRequest(), timeout=10,
                                                           metadata=metadata)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        before = await worker_stats(disagg, decode["address"])
        # the engine link: a plain DEALER and one with another cluster's keys get nothing
        # through; the cluster's own keys do (the control)
        ctx = zmq.asyncio.Context()
        got: dict[str, list] = {"outputs": [], "failed": []}

        def on_outputs(worker_id: str, outputs) -> None:
            got["outputs"] += [o.request_id for o in outputs.outputs]

        def on_failed(worker_id: str, rid: str, message: str) -> None:
            got["failed"].append(rid)

        def on_lost(worker_id: str, rids: list[str] | None, reason: str) -> None:
            pass  # a refused handshake drops the stranger's connection: that is the point

        try:
            await links(ctx, got, on_outputs, on_failed, on_lost)
        finally:
            ctx.destroy(linger=0)  # a failed check must not leave sockets that hang exit
        after = await worker_stats(disagg, decode["address"])
        # the stranger's requests never reached the engine; the control's link request did
        assert after.requests_total == before.requests_total + 1

    async def links(ctx: "zmq.asyncio.Context", got: dict, on_outputs: object,
                    on_failed: object, on_lost: object) -> None:
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(f"tcp://{decode['link_address']}")
        from vllm.v1.serial_utils import MsgpackEncoder
        await plain.send_multipart([ADD, *MsgpackEncoder().encode(link_request("plain"))])
        other = LinkClient(ctx, "d", decode["link_address"], on_outputs, on_failed, on_lost,
                           LinkKeys.derive(stranger))
        await other.add(link_request("other-cluster"))
        await asyncio.sleep(2.0)
        assert got == {"outputs": [], "failed": []}
        assert not await asyncio.wait_for(plain.poll(100), 1)  # and nothing came back
        own = LinkClient(ctx, "d", decode["link_address"], on_outputs, on_failed, on_lost,
                         LinkKeys.derive(secret))
        await own.add(link_request("own-cluster"))
        deadline = time.monotonic() + 60
        while "own-cluster" not in got["outputs"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert set(got["outputs"]) == {"own-cluster"} and not got["failed"], got
        for c in (own, other):
            c.close()
        plain.close(linger=0)

    asyncio.run(probe())


def test_decode_worker_refuses_forged_expired_and_replayed_kv_params(
        disagg: RunningCluster) -> None:
    """KV transfer parameters that the prefill worker did not sign (or changed, expired, or
    already used) are refused by the decode worker, which computes the prompt itself: the
    request still completes, with the same tokens as a correct KV transfer."""
    from services.worker.kv_params_signing import KVParamsSigner

    secret = cluster_secret(disagg)
    ws = workers(disagg)
    prefill = next(w for w in ws if w["role"] == "prefill")
    decode = next(w for w in ws if w["role"] == "decode")
    prompt_ids = [7 + (time.time_ns() + i) % 900 for i in range(80)]  # unseen by any engine
    refused = "splitserve_worker_kv_params_refused_total"

    def refusals(reason: str) -> float:
        try:
            return metric(decode["metrics_url"], refused, reason=reason)
        except AssertionError:  # a reason not seen yet has no series
            return 0.0

    async def scenario() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        async with EngineLinks(secret) as links:
            async def generate(rid: str, kv: dict | None) -> list[int]:
                return await links.generate(decode, rid, prompt_ids, 10, kv, ignore_eos=True)

            signed, _ = await links.prefill(prefill, "signed", prompt_ids)
            assert signed["splitserve_signature"]
            forged = {**signed, "remote_block_ids": [[b + 1 for b in group] for group in
                                                     signed["remote_block_ids"]]} if isinstance(
                signed["remote_block_ids"][0], list) else {
                **signed, "remote_block_ids": [b + 1 for b in signed["remote_block_ids"]]}
            unsigned = {k: v for k, v in signed.items() if not k.startswith("splitserve_")}
            stale = KVParamsSigner(secret, ttl_s=-5).sign("stale", unsigned)
            out["signed"] = await generate("signed", signed)
            out["forged"] = await generate("forged", forged)
            out["unsigned"] = await generate("unsigned", unsigned)
            out["expired"] = await generate("expired", stale)
            out["replayed"] = await generate("replayed", signed)
            out["local"] = await generate("local", None)
        return out

    src = "vllm:prompt_tokens_by_source_total"
    moved_before = metric(decode["metrics_url"], src, source="external_kv_transfer")
    before = {r: refusals(r) for r in ("forged", "unsigned", "expired", "replayed")}
    out = asyncio.run(scenario())
    # every request completed with the tokens of the one whose KV was read from the prefill
    # worker (and of one computed on the decode worker alone)
    assert len(out["local"]) == 10 and all(v == out["local"] for v in out.values()), out
    after = {r: refusals(r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {
        "forged": 1, "unsigned": 1, "expired": 1, "replayed": 1}
    # the signed parameters were taken: the prompt's KV came over NIXL (the refused requests
    # found it in the decode worker's own cache afterwards)
    deadline = time.monotonic() + 10
    while (moved := metric(decode["metrics_url"], src, source="external_kv_transfer")
           - moved_before) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert moved >= 64, moved
