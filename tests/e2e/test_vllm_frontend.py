"""Conformance of the gateway's front end (vLLM's own OpenAI server over the cluster): the
same requests sent to vLLM's own OpenAI server and to splitserve clusters (disaggregated: the
prompt's KV moves over NIXL; aggregated) on the built-in model give the same answers: text,
token ids, logprobs, tool calls, finish reasons, usage; streamed and not. Bad input gets
vLLM's own 400s, and the cluster keeps serving."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import openai
import pytest

from bench.vllm_server import engine_config, start_vllm_server
from tests.support.cluster import RunningCluster, cache_dir_for_tests, start_test_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]
MODEL = "splitserve-tiny"
TOOL_ARGS = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
             "trust_request_chat_template": True}
# JSON without free whitespace: a random-weights model otherwise fills its budget with blanks
# (an engine argument every engine and the front end share)
ENGINE_ARGS = ["--engine-arg", 'structured_outputs_config={"backend": "xgrammar", '
               '"disable_any_whitespace": true}']
LONG = " ".join(["The operator reads the dashboard before the pager rings."] * 12)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}
# bounded values: a random-weights model would otherwise write digits until max_tokens
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "member": {"type": "boolean"}},
          "required": ["name", "member"], "additionalProperties": False}
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
YES_NO = {"regex": "(yes|no)-[0-9]{3}"}


def _chat(content: str = "Hello! What does this module do?", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, **kw}


def _completion(prompt: str = "def fibonacci(n):", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 12, **kw}


# (name, path, body): each sent streamed and not (unless it says stream itself)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat-greedy", "/v1/chat/completions", _chat(temperature=0)),
    ("chat-long-prompt", "/v1/chat/completions", _chat(LONG, temperature=0)),
    ("chat-seeded", "/v1/chat/completions", _chat(temperature=0.9, top_p=0.9, seed=11)),
    ("chat-n2-seeded", "/v1/chat/completions", _chat(LONG, temperature=1.0, seed=3, n=2)),
    ("chat-logprobs", "/v1/chat/completions",
     _chat(temperature=0, logprobs=True, top_logprobs=3)),
    ("chat-penalties", "/v1/chat/completions",
     _chat(temperature=0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)),
    ("chat-topk-minp", "/v1/chat/completions",
     _chat(temperature=1.0, seed=5, top_k=5, min_p=0.05)),
    ("chat-stop", "/v1/chat/completions", _chat(temperature=0, stop=[" a", "e"],
                                                 max_tokens=30)),
    ("chat-logit-bias", "/v1/chat/completions", _chat(temperature=0, logit_bias={"42": 100})),
    ("chat-json-schema", "/v1/chat/completions", _chat(
        "Describe a person", temperature=0, max_tokens=80,
        response_format=PERSON)),
    ("chat-json-object", "/v1/chat/completions", _chat(
        temperature=0, max_tokens=20, response_format={"type": "json_object"})),
    ("chat-regex", "/v1/chat/completions", _chat(
        temperature=0, max_tokens=20, structured_outputs=YES_NO)),
    ("chat-tool-named", "/v1/chat/completions", _chat(
        "Weather in Paris?", temperature=0, max_tokens=80, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})),
    ("chat-tool-required", "/v1/chat/completions", _chat(
        "Weather in Paris?", temperature=0, max_tokens=80, tools=[WEATHER],
        tool_choice="required")),
    ("completion-greedy", "/v1/completions", _completion(temperature=0)),
    ("completion-long", "/v1/completions", _completion(LONG, temperature=0)),
    ("completion-logprobs-echo", "/v1/completions",
     _completion(temperature=0, logprobs=2, echo=True, max_tokens=5)),
    ("completion-stop-ids", "/v1/completions",
     _completion(temperature=0, stop_token_ids=[13, 29], min_tokens=2, max_tokens=30)),
    ("completion-ignore-eos", "/v1/completions",
     _completion(temperature=0.7, seed=9, ignore_eos=True, max_tokens=20)),
    # --- the rest of vLLM's request fields (see test_every_request_field_is_served_or_refused)
    ("chat-max-completion-tokens", "/v1/chat/completions",
     {**_chat(temperature=0), "max_tokens": None, "max_completion_tokens": 7}),
    ("chat-stream-usage", "/v1/chat/completions", _chat(
        temperature=0, stream=True, stream_interval=3,
        stream_options={"include_usage": True, "continuous_usage_stats": True})),
    ("chat-template-options", "/v1/chat/completions", _chat(
        temperature=0, reasoning_effort="low", include_reasoning=False, user="alice",
        documents=[{"title": "Ops", "text": "Read the dashboard."}],
        chat_template_kwargs={"enable_thinking": False}, add_special_tokens=True,
        request_id="conformance-1", session_id="session-1", cache_salt="tenant-a",
        vllm_xargs={"note": "x"})),
    ("chat-thinking-budget", "/v1/chat/completions", _chat(temperature=0,
                                                            thinking_token_budget=4)),
    ("chat-tool-single", "/v1/chat/completions", _chat(
        "Weather in Paris?", temperature=0, max_tokens=80, tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False)),
    ("chat-beam-search", "/v1/chat/completions", _chat(
        temperature=0, use_beam_search=True, n=2, length_penalty=0.8, max_tokens=6)),
    ("chat-watermarking", "/v1/chat/completions", _chat(temperature=0, watermarking=True)),
    ("chat-stop-ids", "/v1/chat/completions", _chat(
        temperature=0, stop_token_ids=[13, 29], min_tokens=2, max_tokens=30, stop=["e"],
        include_stop_str_in_output=True, ignore_eos=True)),
    ("chat-special-tokens", "/v1/chat/completions", _chat(
        temperature=0, skip_special_tokens=False, spaces_between_special_tokens=False)),
    ("chat-truncate", "/v1/chat/completions", _chat(
        LONG, temperature=0, truncate_prompt_tokens=20, truncation_side="left")),
    ("chat-prompt-logprobs", "/v1/chat/completions", _chat(
        temperature=0, prompt_logprobs=2, max_tokens=4)),
    ("chat-token-ids", "/v1/chat/completions", _chat(
        temperature=0, logprobs=True, top_logprobs=2, logprob_token_ids=[42, 13],
        return_tokens_as_token_ids=True, return_token_ids=True, return_prompt_text=True)),
    ("chat-allowed-bad-words", "/v1/chat/completions", _chat(
        temperature=0, allowed_token_ids=[13, 29, 42, 100, 500, 1000], bad_words=["the"])),
    ("chat-continue", "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 8, "temperature": 0, "echo": True,
        "add_generation_prompt": False, "continue_final_message": True,
        "messages": [{"role": "user", "content": "What does this module do?"},
                     {"role": "assistant", "content": "This module"}]}),
    ("chat-request-template", "/v1/chat/completions", _chat(
        temperature=0, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")),
    ("chat-multimodal-options", "/v1/chat/completions", _chat(
        temperature=0, mm_processor_kwargs={"num_crops": 4}, media_io_kwargs={"image": {}})),
    ("chat-render-options", "/v1/chat/completions", _chat(
        temperature=0, mm_payload="none", return_mm_kwargs=False,
        routed_experts_prompt_start=2)),
    ("chat-token-offsets", "/v1/chat/completions", _chat(temperature=0,
                                                          return_token_offsets=True)),
    ("chat-priority", "/v1/chat/completions", _chat(temperature=0, priority=1)),
    ("chat-repetition-detection", "/v1/chat/completions", _chat(
        temperature=0, max_tokens=40, ignore_eos=True,
        repetition_detection={"max_pattern_size": 4, "min_pattern_size": 1,
                              "min_count": 3})),
    ("completion-sampling", "/v1/completions", _completion(
        temperature=1.0, top_p=0.9, top_k=5, min_p=0.05, seed=7, n=2, presence_penalty=1.5,
        frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={"42": 5}, user="alice",
        stop=["e"], include_stop_str_in_output=True)),
    ("completion-stream-usage", "/v1/completions", _completion(
        temperature=0, stream=True, stream_interval=3,
        stream_options={"include_usage": True, "continuous_usage_stats": True})),
    ("completion-suffix", "/v1/completions", _completion(temperature=0, suffix="return")),
    ("completion-beam-search", "/v1/completions", _completion(
        temperature=0, use_beam_search=True, n=2, length_penalty=0.8, max_tokens=6)),
    ("completion-watermarking", "/v1/completions", _completion(temperature=0,
                                                               watermarking=True)),
    ("completion-special-tokens", "/v1/completions", _completion(
        temperature=0, skip_special_tokens=False, spaces_between_special_tokens=False,
        add_special_tokens=False)),
    ("completion-truncate", "/v1/completions", _completion(
        LONG, temperature=0, truncate_prompt_tokens=20, truncation_side="left")),
    ("completion-prompt-logprobs", "/v1/completions", _completion(
        temperature=0, prompt_logprobs=2, max_tokens=4)),
    ("completion-token-ids", "/v1/completions", _completion(
        temperature=0, logprobs=2, logprob_token_ids=[42, 13], return_tokens_as_token_ids=True,
        return_token_ids=True)),
    ("completion-allowed-bad-words", "/v1/completions", _completion(
        temperature=0, allowed_token_ids=[13, 29, 42, 100, 500, 1000], bad_words=["the"])),
    ("completion-json-schema", "/v1/completions", _completion(
        "A person:", temperature=0, max_tokens=80,
        response_format=PERSON)),
    ("completion-regex", "/v1/completions", _completion(
        temperature=0, max_tokens=20, structured_outputs=YES_NO)),
    ("completion-options", "/v1/completions", _completion(
        temperature=0, request_id="conformance-2", session_id="session-2",
        cache_salt="tenant-b", vllm_xargs={"note": "x"}, mm_payload="none",
        return_mm_kwargs=False, routed_experts_prompt_start=2)),
    ("completion-token-offsets", "/v1/completions", _completion(temperature=0,
                                                                return_token_offsets=True)),
    ("completion-thinking-budget", "/v1/completions", _completion(temperature=0,
                                                                  thinking_token_budget=4)),
    ("completion-prompt-embeds", "/v1/completions",
     {"model": MODEL, "max_tokens": 4, "prompt_embeds": "AAAA"}),
    ("completion-priority", "/v1/completions", _completion(temperature=0, priority=1)),
    ("completion-repetition-detection", "/v1/completions", _completion(
        temperature=0, max_tokens=40, ignore_eos=True,
        repetition_detection={"max_pattern_size": 4, "min_pattern_size": 1,
                              "min_count": 3})),
]

BAD: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", _chat(temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})),
    ("/v1/chat/completions", _chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "no_such_tool"}})),
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=10 ** 6)),
    ("/v1/completions", _completion(max_tokens=10 ** 6)),
]


VOLATILE = frozenset({"id", "created", "system_fingerprint"})


def _normal(path: str, body: dict[str, Any], resp: httpx.Response) -> Any:
    """What must match: the status and, for a 200, the whole answer but its ids and times."""
    if resp.status_code != 200:
        return {"status": resp.status_code}
    if body.get("stream"):
        return {"status": 200, "stream": _from_stream(resp.text)}
    data = resp.json()
    rest = {k: v for k, v in data.items() if k not in VOLATILE | {"choices", "usage"}}
    return {"status": 200, "choices": [_choice(c) for c in data["choices"]],
            "usage": {k: data["usage"][k] for k in ("prompt_tokens", "completion_tokens")},
            "rest": rest}


def _choice(c: dict[str, Any]) -> dict[str, Any]:
    msg = c.get("message") or {}
    calls = [{"name": t["function"]["name"], "arguments": json.loads(t["function"]["arguments"])}
             for t in msg.get("tool_calls") or []]
    more = {k: v for k, v in c.items() if k not in {"message", "text", "index", "finish_reason",
                                                     "stop_reason", "logprobs"}}
    more.update({f"message.{k}": v for k, v in msg.items() if k not in {"content", "tool_calls"}})
    return {"index": c["index"], "text": c.get("text", msg.get("content")),
            "tool_calls": calls, "finish_reason": c["finish_reason"],
            "stop_reason": c.get("stop_reason"), "logprobs": c.get("logprobs"), "more": more}


def _from_stream(text: str) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("error"):  # vLLM's error event in a 200 stream
            out["error"] = event["error"].get("message")
        if event.get("usage"):
            out["usage"] = {k: event["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
        for c in event.get("choices", []):
            seen = out.setdefault(c["index"], {"text": "", "finish_reason": None,
                                               "token_ids": []})
            delta = c.get("delta") or {}
            seen["text"] += c.get("text") or delta.get("content") or ""
            seen["token_ids"] += c.get("token_ids") or []
            if c.get("finish_reason"):
                seen["finish_reason"] = c["finish_reason"]
    return out


def _close(a: Any, b: Any, where: str = "") -> None:
    """Equal, floats within 1e-3 (logprobs of float32 engines on different cores)."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3), (where, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _requests() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for name, path, body in CASES:
        out.append((name, path, body))
        if "stream" not in body:
            out.append((f"{name}-stream", path, {**body, "stream": True}))
    return out


def _send_all(url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=120) as client:
        return {name: _normal(path, body, client.post(path, json=body))
                for name, path, body in _requests()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """vLLM's own server's answers, with the same engine settings as the clusters' workers."""
    up_args = ["--mode", "aggregated", "--workers", "1", *ENGINE_ARGS]
    eng = engine_config(up_args, cache_dir_for_tests())
    run_dir = tmp_path_factory.mktemp("vllm-server")
    from services.worker.engine_args import cli_tokens, server_parser

    server = start_vllm_server(eng, run_dir, cache_dir_for_tests(),
                               extra_args=cli_tokens(TOOL_ARGS, server_parser()))
    try:
        return _send_all(server.url)
    finally:
        server.stop()


@dataclass
class FrontendCluster:
    mode: str
    up: RunningCluster

    @property
    def http(self) -> str:
        return self.up.http

    @property
    def redis_url(self) -> str:
        return self.up.redis_url


@pytest.fixture(scope="module", params=["disaggregated", "aggregated"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[FrontendCluster]:
    """A cluster behind vLLM's front end, one mode at a time (the KV-aware policy with every
    prompt sent to the prefill worker, so that KV moves for short prompts too)."""
    mode = request.param
    args = ["--kv-local-prefill-tokens", "0", "--route-headers",
            *ENGINE_ARGS,
            *[f"--frontend-arg={k}={v}" for k, v in TOOL_ARGS.items()]]
    args += ["--mode", "aggregated", "--workers", "1"] if mode == "aggregated" else [
        "--mode", "disaggregated", "--decode", "2"]  # two: a request has somewhere to move
    run_dir = tmp_path_factory.mktemp(f"vllm-frontend-{mode}") / "run"
    c = start_test_cluster(args, run_dir)
    try:
        yield FrontendCluster(mode, c)
    finally:
        assert c.stop() == 0
        assert not c.alive_descendants(), "processes survived the cluster"


@pytest.fixture(scope="module")
def answers(cluster: FrontendCluster) -> dict[str, Any]:
    return _send_all(cluster.http)


# cases vLLM's own server refuses in this configuration (400, or an error event in a streamed
# 200): the cluster must refuse them the same way, with vLLM's message
REFUSED_BY_VLLM = frozenset({
    "chat-thinking-budget", "chat-thinking-budget-stream",  # no reasoning parser
    "completion-thinking-budget", "completion-thinking-budget-stream",
    "chat-prompt-logprobs-stream", "completion-prompt-logprobs-stream",  # not when streamed
    "chat-multimodal-options", "chat-multimodal-options-stream",  # a text-only model
    "completion-suffix", "completion-suffix-stream",  # vLLM serves no suffix
    "completion-beam-search-stream",  # not when streamed
    "completion-prompt-embeds", "completion-prompt-embeds-stream",  # --enable-prompt-embeds
})


@pytest.mark.parametrize("name", [n for n, _, _ in _requests()])
def test_same_answer_as_vllms_own_server(reference: dict[str, Any], answers: dict[str, Any],
                                         name: str) -> None:
    ref = reference[name]
    refused = ref["status"] != 200 or "error" in ref.get("stream", {})
    assert refused == (name in REFUSED_BY_VLLM), ref
    _close(answers[name], ref, name)


def test_structured_outputs_and_tool_calls_are_well_formed(answers: dict[str, Any]) -> None:
    assert answers["chat-json-schema"]["choices"][0]["finish_reason"] == "stop"
    person = json.loads(answers["chat-json-schema"]["choices"][0]["text"])
    assert set(person) == {"name", "member"} and isinstance(person["member"], bool)
    assert len(person["name"]) <= 12
    # vLLM's hermes parser turns the constrained output into tool calls; what the arguments
    # hold is the random-weights model's (vLLM's own server gives the same: see above)
    for name in ("chat-tool-named", "chat-tool-required"):
        choice = answers[name]["choices"][0]
        if choice["tool_calls"]:
            assert all(c["name"] == "get_weather" for c in choice["tool_calls"]), choice
        else:
            # The call's envelope and name are forced; its arguments are whatever a
            # random-weights model writes, which on some CPUs never ends (digits, blanks)
            # within max_tokens: then the constrained call is cut, not missing.
            assert choice["finish_reason"] == "length", choice
            assert choice["text"].startswith('<tool_call>{"name": "get_weather"'), choice
    import re
    assert re.fullmatch(r"(yes|no)-[0-9]{3}", answers["chat-regex"]["choices"][0]["text"])


def test_tool_calls_through_the_openai_client(cluster: FrontendCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", r
    json.loads(calls[0].function.arguments)  # JSON, as vLLM's parser hands it over


def test_kv_moves_in_disaggregated_mode(cluster: FrontendCluster, answers: dict[str, Any]
                                        ) -> None:
    """The gateway's own vLLM metrics count the decode engines' prompt tokens by where they
    came from: over NIXL when disaggregated, computed locally when aggregated."""
    text = httpx.get(f"{cluster.http}/metrics", timeout=10).text
    by_source = {}
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{"):
            source = line.split('source="')[1].split('"')[0]
            by_source[source] = float(line.rsplit(" ", 1)[1])
    if cluster.mode == "disaggregated":
        assert by_source["external_kv_transfer"] > 0, by_source
    else:
        assert by_source["external_kv_transfer"] == 0 and by_source["local_compute"] > 0


@pytest.mark.parametrize("path,body", BAD)
def test_bad_input_gets_vllms_400_and_the_cluster_serves_on(
        cluster: FrontendCluster, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(cluster.http + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] == 400
    ok = httpx.post(cluster.http + "/v1/completions", json=_completion(temperature=0),
                    timeout=60)
    assert ok.status_code == 200


# fields a client may not set: splitserve runs the KV handoff (reserved_fields.py)
REFUSED = ("kv_transfer_params", "ec_transfer_params", "vllm_xargs.kv_transfer_params")
PATHS = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}


def _request_models() -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_request_field_is_served_or_refused(path: str) -> None:
    """Every field of vLLM's request model is set by a conformance case (whose answer must be
    vLLM's own server's) or refused with a 400 naming it (test_a_reserved_field_is_refused):
    a field vLLM adds in a new version fails here until it is one or the other."""
    fields = set(_request_models()[path].model_fields)
    assert len(fields) > 40, "vLLM's request model is not the one this walk was written for"
    cased = {k for _, p, body in CASES if p == path for k in body} | {"stream"}
    refused = {f for f in REFUSED if "." not in f}
    missing = sorted(fields - cased - refused)
    assert not missing, f"{PATHS[path]} fields with no conformance case and no refusal: {missing}"
    assert not cased - fields, f"cases set fields {PATHS[path]} lacks: {cased - fields}"


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("field", REFUSED)
def test_a_reserved_field_is_refused(cluster: FrontendCluster, path: str, field: str) -> None:
    body = _chat(temperature=0) if "chat" in path else _completion(temperature=0)
    value = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [0]}
    if field.startswith("vllm_xargs."):
        body["vllm_xargs"] = {field.split(".", 1)[1]: 1}
    else:
        body[field] = value
    for stream in (False, True):
        r = httpx.post(cluster.http + path, json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and f"'{field}'" in err["message"], err
    ok = httpx.post(cluster.http + "/v1/completions", json=_completion(temperature=0),
                    timeout=60)
    assert ok.status_code == 200


def test_tokenize_detokenize_models_responses(cluster: FrontendCluster) -> None:
    with httpx.Client(base_url=cluster.http, timeout=60) as c:
        ids = c.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
        assert ids["count"] == len(ids["tokens"]) > 0
        text = c.post("/detokenize", json={"model": MODEL, "tokens": ids["tokens"]}).json()
        assert "Hello world" in text["prompt"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL]
        assert c.get("/health").status_code == 200  # vLLM's, with workers to route to
        r = c.post("/v1/responses", json={"model": MODEL, "input": "Hi",
                                          "max_output_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["output"], r.text


def test_prefill_blocks_are_freed(cluster: FrontendCluster, answers: dict[str, Any]) -> None:
    """After every request is done, no engine holds KV blocks for anyone (the prefill worker
    freed what the decode worker read)."""
    import subprocess
    import sys
    import time

    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                              "--redis-url", cluster.redis_url], capture_output=True,
                             text=True, check=True, timeout=60)
        loads = [w["load"] for w in json.loads(out.stdout)]
        if all(w["kv_cache_usage"] == 0 and w["in_flight"] == 0 for w in loads):
            return
        assert time.monotonic() < deadline, loads
        time.sleep(0.5)


def _audit(url: str) -> dict[str, float]:
    """The gateway's routing-audit counters, as vLLM's /metrics serves them."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("splitserve_gateway_route_") and "_total" in line:
            name, val = line.rsplit(" ", 1)
            out[name.removeprefix("splitserve_gateway_route_")] = float(val)
    return out


def test_routing_audit_through_vllms_front_end(cluster: FrontendCluster) -> None:
    """The same prompt twice: the second time the prefill worker (every prompt goes there)
    holds its prefix, and the index's prediction is the prefill engine's own hit, in the
    counters on vLLM's /metrics and in the gateway's log line. Aggregated with one worker the
    route is forced: no lookup, nothing audited."""
    import random
    import time

    bs = 32  # `up`'s default block size
    ids = [random.Random(16).randrange(5, 8192) for _ in range(6 * bs + 5)]
    before = _audit(cluster.http)
    assert "audited_requests_total" in before, "gateway metrics missing from vLLM's /metrics"
    body = {"model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{cluster.http}/v1/completions", json=body, timeout=60).status_code == 200
    time.sleep(1.5)  # the prefill engine's BlockStored events reach the index
    mid = _audit(cluster.http)
    assert httpx.post(f"{cluster.http}/v1/completions", json=body, timeout=60).status_code == 200
    after = _audit(cluster.http)
    delta = {k: after[k] - mid[k] for k in after}
    if cluster.mode == "aggregated":
        assert after == before, "a forced route was audited"
        return
    assert mid["audited_requests_total"] - before["audited_requests_total"] == 1
    assert delta["audited_requests_total"] == 1
    assert delta["predicted_cached_tokens_total"] == 6 * bs
    assert delta["reported_cached_tokens_total"] == 6 * bs
    assert delta["matched_cached_tokens_total"] == 6 * bs
    assert delta['mispredictions_total{direction="over"}'] == 0
    assert delta['mispredictions_total{direction="under"}'] == 0
    logs = "".join(p.read_text() for p in cluster.up.run_dir.rglob("gateway.log"))
    assert f"predicted {6 * bs} cached tokens, engine reported {6 * bs} (hit)" in logs


@pytest.mark.parametrize("stream", [False, True])
def test_route_headers_name_the_workers(cluster: FrontendCluster, stream: bool) -> None:
    """`--route-headers`: the response names the workers that served it, streamed too (its
    headers are held until the request is routed)."""
    roles = {w["worker_id"]: w["role"] for w in _status(cluster)}
    body = _completion(LONG, temperature=0, stream=stream)
    with httpx.stream("POST", f"{cluster.http}/v1/completions", json=body, timeout=60) as r:
        r.read()
        assert r.status_code == 200
        headers = r.headers
    decode, prefill = headers["x-splitserve-decode-worker"], headers["x-splitserve-prefill-worker"]
    assert headers["x-splitserve-route-reason"]
    if cluster.mode == "disaggregated":
        assert roles[decode] == "decode" and roles[prefill] == "prefill", (headers, roles)
        predicted = int(headers["x-splitserve-predicted-cached-tokens"])
        assert int(headers["x-splitserve-reported-cached-tokens"]) >= 0 and predicted >= 0
    else:
        assert roles[decode] == "both" and prefill == "local", (headers, roles)
    assert "x-splitserve-decode-worker" not in httpx.get(f"{cluster.http}/v1/models").headers


# --- the gRPC API ------------------------------------------------------------------------------

def _http_stream(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed HTTP answer put together by choice: text, token ids, finish reason, tool
    calls, logprobs (token, logprob, alternatives); and usage."""
    choices: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    with httpx.stream("POST", url + path, json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for c in event.get("choices") or ():
                seen = choices.setdefault(c["index"], {"text": "", "token_ids": [],
                                                       "finish_reason": None, "calls": {},
                                                       "logprobs": []})
                delta = c.get("delta") or {}
                seen["text"] += (delta.get("content") if "delta" in c else c.get("text")) or ""
                seen["token_ids"] += c.get("token_ids") or []
                seen["finish_reason"] = c.get("finish_reason") or seen["finish_reason"]
                for d in delta.get("tool_calls") or ():
                    call = seen["calls"].setdefault(d["index"], ["", ""])
                    call[0] += (d.get("function") or {}).get("name") or ""
                    call[1] += (d.get("function") or {}).get("arguments") or ""
                lp = c.get("logprobs") or {}
                if "content" in lp:
                    seen["logprobs"] += [(e["token"], e["logprob"],
                                          [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
                                         for e in lp["content"] or ()]
                elif lp:
                    seen["logprobs"] += [(t, p, sorted(top.items(), key=lambda kv: -kv[1]))
                                         for t, p, top in zip(lp["tokens"], lp["token_logprobs"],
                                                              lp["top_logprobs"])]
    return {"choices": [{"text": c["text"], "token_ids": c["token_ids"],
                         "finish_reason": c["finish_reason"],
                         "tool_calls": [c["calls"][i] for i in sorted(c["calls"])],
                         "logprobs": c["logprobs"]} for _, c in sorted(choices.items())],
            "usage": [usage.get("prompt_tokens"), usage.get("completion_tokens")]}


def _grpc_answer(done: Any) -> dict[str, Any]:
    """An SDK Completion in _http_stream's shape."""
    return {"choices": [{"text": c.text, "token_ids": list(c.token_ids),
                         "finish_reason": c.finish_reason,
                         "tool_calls": [[t.name, t.arguments] for t in c.tool_calls],
                         "logprobs": [(t.token, t.logprob, sorted(
                             [list(a) for a in t.top], key=lambda kv: -kv[1]))
                             for t in c.logprobs]} for c in done.choices],
            "usage": [done.usage.prompt_tokens, done.usage.completion_tokens]}


def _lists(x: Any) -> Any:
    """Tuples as lists, for _close."""
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    return x


HELLO = [{"role": "user", "content": "Hello! What does this module do?"}]
PARIS = [{"role": "user", "content": "Weather in Paris?"}]
# (name, HTTP path, HTTP body, SDK method, its positional argument, its keywords): the same
# request over HTTP (streamed) and over gRPC
GRPC_CASES: list[tuple[str, str, dict[str, Any], str, Any, dict[str, Any]]] = [
    ("greedy", "/v1/chat/completions", _chat(temperature=0), "chat", HELLO,
     {"max_tokens": 12, "temperature": 0}),
    ("n2-seeded", "/v1/chat/completions", _chat(LONG, temperature=1.0, seed=3, n=2), "chat",
     [{"role": "user", "content": LONG}],
     {"max_tokens": 12, "temperature": 1.0, "seed": 3, "n": 2}),
    ("logprobs", "/v1/chat/completions", _chat(temperature=0, logprobs=True, top_logprobs=3),
     "chat", HELLO, {"max_tokens": 12, "temperature": 0, "logprobs": 3}),
    ("sampling", "/v1/chat/completions",
     _chat(temperature=1.0, seed=5, top_k=5, min_p=0.05, presence_penalty=1.5,
           frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={"42": 5}), "chat", HELLO,
     {"max_tokens": 12, "temperature": 1.0, "seed": 5, "top_k": 5, "min_p": 0.05,
      "presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3,
      "logit_bias": {42: 5}}),
    ("json-schema", "/v1/chat/completions",
     _chat("Describe a person", temperature=0, max_tokens=80,
           structured_outputs={"json": SCHEMA}), "chat",
     [{"role": "user", "content": "Describe a person"}],
     {"max_tokens": 80, "temperature": 0, "json_schema": SCHEMA}),
    ("regex", "/v1/chat/completions",
     _chat(temperature=0, max_tokens=20, structured_outputs={"regex": "(yes|no)-[0-9]{3}"}),
     "chat", HELLO, {"max_tokens": 20, "temperature": 0, "regex": "(yes|no)-[0-9]{3}"}),
    ("tool-named", "/v1/chat/completions",
     _chat("Weather in Paris?", temperature=0, max_tokens=80, tools=[WEATHER],
           tool_choice={"type": "function", "function": {"name": "get_weather"}}), "chat",
     PARIS, {"max_tokens": 80, "temperature": 0, "tools": [WEATHER],
             "tool_choice": "get_weather"}),
    ("tool-required", "/v1/chat/completions",
     _chat("Weather in Paris?", temperature=0, max_tokens=80, tools=[WEATHER],
           tool_choice="required"), "chat", PARIS,
     {"max_tokens": 80, "temperature": 0, "tools": [WEATHER], "tool_choice": "required"}),
    ("completion-logprobs", "/v1/completions", _completion(temperature=0, logprobs=2),
     "generate", "def fibonacci(n):", {"max_tokens": 12, "temperature": 0, "logprobs": 2}),
    ("completion-stop-ids", "/v1/completions",
     _completion(temperature=0, stop_token_ids=[13, 29], min_tokens=2, max_tokens=30,
                 stop=["e"], include_stop_str_in_output=True), "generate", "def fibonacci(n):",
     {"max_tokens": 30, "temperature": 0, "stop_token_ids": [13, 29], "min_tokens": 2,
      "stop": ["e"], "include_stop_str_in_output": True}),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_gives_the_http_answer(cluster: FrontendCluster, case: tuple) -> None:
    """The gRPC API is vLLM's serving layer too: every sampling and output parameter, tool
    calls and structured output give over gRPC what the same request gives over HTTP."""
    import splitserve_sdk as sdk

    name, path, body, method, arg, kw = case
    http = _http_stream(cluster.http, path, body)
    assert cluster.up.grpc, "the vLLM front end serves no gRPC"
    with sdk.Client(cluster.up.grpc, model=MODEL, timeout=120) as client:
        done = getattr(client, method)(arg, **kw)
    got = _grpc_answer(done)
    _close(_lists(got), _lists(http), name)
    assert got["choices"][0]["token_ids"], "no tokens: the case tests nothing"
    if name.startswith("tool"):
        assert done.finish_reason == "length" or done.tool_calls, done


@pytest.mark.parametrize("kw,says", [
    ({"json_schema": {"type": "no-such-type"}}, ""),
    ({"tools": [WEATHER], "tool_choice": "no_such_tool"}, "tool_choice"),
    ({"logprobs": 10 ** 6}, "logprobs"),
    ({"max_tokens": 10 ** 6}, "max"),
    ({"tools": [{"name": "f", "parameters": "{not json"}]}, "parameters_json"),
    ({"temperature": -1.0}, "temperature"),
])
def test_grpc_bad_input_is_invalid_argument_and_the_cluster_serves_on(
        cluster: FrontendCluster, kw: dict[str, Any], says: str) -> None:
    import splitserve_sdk as sdk

    with sdk.Client(cluster.up.grpc, model=MODEL, timeout=60, retries=0) as client:
        with pytest.raises(sdk.InvalidArgument) as err:
            client.chat(HELLO, **{"max_tokens": 4, **kw})
        assert says in str(err.value), err.value
        assert client.chat(HELLO, max_tokens=4, temperature=0).finish_reason == "length"


# --- migration ----------------------------------------------------------------------------------

MOVE_TOKENS = 900


def _status(cluster: FrontendCluster) -> list[dict[str, Any]]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                          "--redis-url", cluster.redis_url], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def _gateway_metric(cluster: FrontendCluster, name: str) -> float:
    text = httpx.get(f"{cluster.http}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class _Stream:
    """One streamed completion in a thread: its text, logprobs, finish reason or error."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        import threading

        self.body = body
        self.text, self.logprobs, self.tokens, self.error = "", [], 0, None
        self.finish_reason: str | None = None
        self.decode: str | None = None  # the decode worker, by the route headers
        self.routed = threading.Event()
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=300,
                              json={**self.body, "stream": True}) as resp:
                assert resp.status_code == 200, resp.read()
                self.decode = resp.headers.get("x-splitserve-decode-worker")
                self.routed.set()
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]
                        continue
                    for c in chunk["choices"]:
                        self.text += c["text"]
                        if c.get("logprobs"):
                            self.logprobs += c["logprobs"]["token_logprobs"]
                            self.tokens += len(c["logprobs"]["token_logprobs"])
                        self.finish_reason = c.get("finish_reason") or self.finish_reason
                    self.started.set()
        except Exception as exc:  # recorded, and the test says so
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.routed.set()
            self.started.set()

    def join(self) -> None:
        self._thread.join(300)
        assert not self._thread.is_alive(), "a stream never ended"


def _decode_in_flight(cluster: FrontendCluster) -> dict[str, int]:
    """Every decode worker's requests in flight, as it last published them (every 0.5 s)."""
    import asyncio

    from redis.asyncio import Redis

    from router.registry import WorkerRegistry

    async def read() -> dict[str, int]:
        redis = Redis.from_url(cluster.redis_url)
        try:
            return {w.worker_id: w.load.in_flight
                    for w in await WorkerRegistry(redis).live_workers()
                    if w.role.value == "decode"}
        finally:
            await redis.aclose()

    return asyncio.run(read())


def test_requests_move_off_a_killed_decode_worker(cluster: FrontendCluster) -> None:
    """A decode worker's process is SIGKILLed under streaming requests: greedy requests (with
    logprobs) continue on the other decode worker and equal, token for token and logprob for
    logprob, what the cluster answered before; a seeded-sampling request and a json_schema
    request that had produced tokens cannot continue as the same request and end with a clean
    error, not a wrong output. The gateway counts the migrations."""
    import signal
    import time

    import psutil

    if cluster.mode != "disaggregated":
        pytest.skip("one decode worker: nowhere to move (the disaggregated cluster has two)")
    decode = {w["worker_id"]: w for w in _status(cluster) if w["role"] == "decode"}
    assert len(decode) == 2, decode
    greedy = [{"model": MODEL, "prompt": f"Worker {k} fails under request {k}: " + LONG[:80],
               "max_tokens": MOVE_TOKENS, "temperature": 0, "ignore_eos": True,
               "logprobs": 1} for k in range(6)]
    seeded = {"model": MODEL, "prompt": "A seeded request cannot move: " + LONG[:80],
              "max_tokens": MOVE_TOKENS, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    reference = [_Stream(cluster.http, body) for body in greedy]
    for r in reference:
        r.join()
        assert r.error is None and r.tokens == MOVE_TOKENS, r.error
    moved_before = _gateway_metric(cluster, "splitserve_gateway_request_migrations_total")

    # the seeded request alone first, so that its worker is known: that worker is the victim
    s = _Stream(cluster.http, seeded)
    deadline = time.monotonic() + 60
    while sum((load := _decode_in_flight(cluster)).values()) != 1:
        assert time.monotonic() < deadline and s.error is None, (load, s.error)
        time.sleep(0.1)
    victim = decode[next(w for w, n in load.items() if n == 1)]
    # json_schema requests (a string longer than the budget: no early end) until one runs on
    # the victim, by its route headers; the others run on the other worker undisturbed
    long_string = {"type": "json_schema", "json_schema": {"name": "text", "schema": {
        "type": "string", "minLength": 20 * MOVE_TOKENS}}}
    structured: list[_Stream] = []
    while not any(st.decode == victim["worker_id"] for st in structured):
        assert len(structured) < 4, [st.decode for st in structured]
        st = _Stream(cluster.http, {"model": MODEL, "prompt": "JSON cannot move: ",
                                    "max_tokens": MOVE_TOKENS, "temperature": 0,
                                    "response_format": long_string})
        st.routed.wait(60)
        assert st.error is None, st.error
        structured.append(st)
    on_json = next(st for st in structured if st.decode == victim["worker_id"])
    deadline = time.monotonic() + 60
    while _decode_in_flight(cluster)[victim["worker_id"]] < 2:
        assert time.monotonic() < deadline, "the victim's load never showed the json request"
        time.sleep(0.1)
    # greedy requests until at least one of them runs on the victim too
    streams: list[_Stream] = []
    for body in greedy:
        streams.append(_Stream(cluster.http, body))
        deadline = time.monotonic() + 1.5  # the published load lags 0.5 s at most
        while (on_victim := _decode_in_flight(cluster)[victim["worker_id"]]) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        if on_victim >= 3:
            break
    assert on_victim >= 3, "no greedy request ran on the victim beside the seeded and json ones"
    # (a greedy stream that ended before the kill is still compared; the migration count
    # below shows that one moved)
    assert s.finish_reason is None and streams[-1].finish_reason is None, \
        "streams ended before the kill: make them longer"
    assert on_json.finish_reason is None, "the json request ended before the kill"
    psutil.Process(victim["pid"]).send_signal(signal.SIGKILL)
    for st in [s, *streams, *structured]:
        st.join()
    for k, st in enumerate(streams):
        assert st.error is None, (k, st.error)
        assert st.finish_reason == "length" and st.tokens == MOVE_TOKENS, (k, st.tokens)
        assert st.text == reference[k].text, f"request {k} differs after the move"
        _close(st.logprobs, reference[k].logprobs, f"greedy[{k}].logprobs")
    assert s.error is not None and s.finish_reason != "length", \
        "the seeded request went on elsewhere as if nothing happened"
    assert on_json.error is not None and on_json.finish_reason != "length", \
        "the json_schema request went on elsewhere as if nothing happened"
    for st in structured:
        if st is not on_json:  # on the other worker: served whole
            assert st.error is None and st.finish_reason == "length", (st.error, st.tokens)
        assert st.text.startswith('"'), st.text[:80]  # the grammar's, wherever it ran
    moved = _gateway_metric(cluster, "splitserve_gateway_request_migrations_total")
    assert moved - moved_before >= 1, "no request moved: the test did not test migration"
    # the cluster serves on (the other decode worker; the controller replaces the victim)
    with httpx.Client(base_url=cluster.http, timeout=300) as c:
        r = c.post("/v1/completions", json={**greedy[0], "max_tokens": 8, "logprobs": None})
        assert r.status_code == 200, r.text
        assert reference[0].text.startswith(r.json()["choices"][0]["text"])
