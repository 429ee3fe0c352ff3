"""`helm test`: the release serves its model over HTTP and gRPC.

Run by the chart's test Pod (templates/tests/test-completion.yaml) with the splitserve image, and by
tests/e2e/test_helm_test_hook.py against a real cluster. Reads:
  SPLITSERVE_HTTP     gateway base URL, e.g. http://rel-splitserve-gateway:8000
  SPLITSERVE_GRPC     gateway gRPC target, e.g. rel-splitserve-gateway:50051
  SPLITSERVE_MODEL    the served model name the gateway must list
  SPLITSERVE_PROMPT, SPLITSERVE_MAX_TOKENS   the test completion
  SPLITSERVE_API_KEYS_FILE  optional: the gateway's API keys (the first one is used)
  SPLITSERVE_WAIT_S   how long to wait for the gateway to see live workers (default 300)
Exits 0 when every check passed, 1 with the failed check on stderr otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request


class CheckFailed(Exception):
    pass


def api_key() -> str | None:
    path = os.environ.get("SPLITSERVE_API_KEYS_FILE", "")
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                return line
    return None


def http(method: str, url: str, key: str | None, body: dict | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_healthy(base: str, deadline_s: float) -> dict:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{base}/health", None, timeout=10)
            if status == 200:
                return body
            last = body
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(2)
    raise CheckFailed(f"gateway {base}/health not ready after {deadline_s:.0f}s: {last}")


def run() -> None:
    base = os.environ["SPLITSERVE_HTTP"].rstrip("/")
    target = os.environ["SPLITSERVE_GRPC"]
    model = os.environ["SPLITSERVE_MODEL"]
    prompt = os.environ.get("SPLITSERVE_PROMPT", "Hello")
    max_tokens = int(os.environ.get("SPLITSERVE_MAX_TOKENS", "8"))
    key = api_key()

    health = wait_healthy(base, float(os.environ.get("SPLITSERVE_WAIT_S", "300")))
    print(f"ok: /health {health}")

    status, body = http("GET", f"{base}/v1/models", key)
    ids = [m.get("id") for m in body.get("data", [])]
    if status != 200 or model not in ids:
        raise CheckFailed(f"GET /v1/models: HTTP {status}, models {ids}, expected {model!r}")
    print(f"ok: /v1/models lists {ids}")

    status, body = http("POST", f"{base}/v1/completions", key, {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    choices = body.get("choices") or [{}]
    usage = body.get("usage") or {}
    if status != 200 or not isinstance(choices[0].get("text"), str) \
            or not usage.get("completion_tokens"):
        raise CheckFailed(f"POST /v1/completions: HTTP {status}: {body}")
    print(f"ok: /v1/completions {usage['completion_tokens']} tokens: {choices[0]['text']!r}")

    from splitserve_sdk import Client  # the image ships the SDK

    with Client(target, timeout=120, token=key) as client:
        grpc_ids = [m.id for m in client.models()]
        if model not in grpc_ids:
            raise CheckFailed(f"gRPC ListModels: {grpc_ids}, expected {model!r}")
        h = client.health()
        if not h.serving:
            raise CheckFailed(f"gRPC Health: {h}")
    print(f"ok: gRPC ListModels lists {grpc_ids}; Health {h.status} {h.workers}")


def main() -> int:
    try:
        run()
    except CheckFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("helm test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
