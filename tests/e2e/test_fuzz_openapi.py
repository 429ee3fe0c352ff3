"""Fuzzing the gateway's own OpenAPI document (schemathesis, over real HTTP) against a real
cluster: schema-valid and schema-invalid requests to every operation must never get a 5xx, every
answer must be one the document declares (status, media type, body schema), schema-invalid
bodies must be refused, and afterwards both workers must still be alive and serving.

Generation is bounded so the test stays well under 90 s on 2 cores: a fixed number of examples
per operation and mode, derandomized (the same cases on every run), and schema-valid bodies ask
for at most 8 tokens of the served model (otherwise most would be 404s for random model names,
and a chat without max_tokens may generate up to the whole context)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.e2e.test_data_path import MODEL, chat, workers
from tests.support.cluster import RunningCluster

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

pytestmark = pytest.mark.e2e

EXAMPLES = {"POST /v1/completions": 100, "POST /v1/chat/completions": 100}
DEFAULT_EXAMPLES = 10
MAX_TOKENS = 8
NOT_FOR_THIS_MODEL = {"/v1/systemone"}
"""vLLM's own server answers these with 501 for a model without the capability (the built-in
model has none): vLLM's answer, not a server error."""
SAMPLES: list | None = None  # set to a list to keep refused requests (debugging)
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance,
          st_checks.content_type_conformance, st_checks.response_schema_conformance,
          st_checks.negative_data_rejection]


LAX_CHECKS = [c for c in CHECKS if c is not st_checks.negative_data_rejection]


def _vllm_accepts(path: str, body: Any) -> bool:
    """Whether vLLM's own request model of `path` validates `body` (pydantic's lax mode takes
    e.g. 1 for true): a schema-violating body vLLM's server serves is served alike, not a
    parameter accepted and ignored."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = {"/v1/chat/completions": ChatCompletionRequest,
             "/v1/completions": CompletionRequest}.get(path)
    if model is None or not isinstance(body, dict):
        return False
    try:
        model.model_validate(body)
    except Exception:
        return False
    return True


def _bounded(body: Any, chat_op: bool) -> None:
    """Schema-valid bodies: the served model, at most MAX_TOKENS tokens."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if chat_op and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS


def fuzz(base_url: str) -> tuple[list[str], Counter]:
    """Run every operation in both modes; the failures found and the statuses seen."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    seen: Counter = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = EXAMPLES.get(op.label, DEFAULT_EXAMPLES)

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                if mode == GenerationMode.POSITIVE:
                    _bounded(case.body, op.path == "/v1/chat/completions")
                response = case.call(timeout=60)
                if response.status_code == 501 and op.path in NOT_FOR_THIS_MODEL:
                    assert response.json()["error"]["type"] == "NotImplementedError"
                    return
                seen[(op.label, mode.value, response.status_code)] += 1
                if SAMPLES is not None and response.status_code != 200:
                    SAMPLES.append((op.label, mode.value, case.body, response.text[:300]))
                lax = (mode == GenerationMode.NEGATIVE and response.status_code == 200
                       and _vllm_accepts(op.path, case.body))
                case.validate_response(response, checks=LAX_CHECKS if lax else CHECKS)

            try:
                run()
            except Unsatisfiable:
                # an operation without parameters or body has no schema-invalid requests
                assert mode == GenerationMode.NEGATIVE, op.label  # e.g. GET /health, POST /ping
            except Exception as exc:  # collect all operations' failures, then report
                failures.append(f"{op.label} [{mode.value}]: {exc}")
    return failures, seen


def test_openapi_fuzzing_finds_no_server_error(disagg: RunningCluster) -> None:
    start = time.monotonic()
    failures, seen = fuzz(disagg.http)
    took = time.monotonic() - start
    assert not failures, "\n\n".join(failures)
    statuses = Counter()
    for (label, _, status), n in seen.items():
        statuses[status // 100] += n
    # the fuzzing reached the whole pipeline (generations served) and its refusals
    assert statuses[2] > 0 and statuses[4] > 0 and statuses[5] == 0, seen
    generated = sum(n for (label, mode, status), n in seen.items()
                    if label.startswith("POST") and status == 200)
    assert generated >= 5, seen
    print(f"fuzzed {sum(seen.values())} requests in {took:.0f} s: {dict(statuses)}")
    # nothing crashed: both workers are registered and the cluster serves
    assert sorted(w["role"] for w in workers(disagg)) == ["decode", "prefill"]
    assert httpx.get(f"{disagg.http}/health", timeout=10).status_code == 200
    assert chat(disagg, [{"role": "user", "content": "Still there?"}])
