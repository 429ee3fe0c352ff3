"""The fields splitserve owns are refused by name (services/gateway/reserved_fields.py), and
the HTTP guard answers them with vLLM's 400 before the app runs."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.gateway.admission import Admission
from services.gateway.http_guard import GuardMiddleware
from services.gateway.reserved_fields import reserved_field_refusal


@pytest.mark.parametrize("body,field", [
    ({"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    ({"ec_transfer_params": {}}, "ec_transfer_params"),
    ({"vllm_xargs": {"kv_transfer_params": 1}}, "vllm_xargs.kv_transfer_params"),
    ({"vllm_xargs": {"ec_transfer_params": "x"}}, "vllm_xargs.ec_transfer_params"),
])
def test_a_reserved_field_is_refused_naming_it(body: dict[str, Any], field: str) -> None:
    err = reserved_field_refusal(json.dumps({"model": "m", "prompt": "p", **body}).encode())
    assert err is not None and err.status == 400 and err.param == field
    assert f"'{field}'" in err.message and err.code == 400


@pytest.mark.parametrize("body", [
    b'{"model": "m", "prompt": "kv_transfer_params"}',  # mentioned, not set
    b'{"model": "m", "kv_transfer_params": null}',  # vLLM's default
    b'{"model": "m", "vllm_xargs": {"note": "x"}}',
    b'not json kv_transfer_params', b'["kv_transfer_params"]',
])
def test_what_does_not_set_one_passes(body: bytes) -> None:
    assert reserved_field_refusal(body) is None


def test_the_guard_refuses_before_the_app_runs() -> None:
    app = FastAPI()
    seen: list[Any] = []

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return {"ok": True}

    admission = Admission(4)
    guarded = GuardMiddleware(app, admission, None, 1 << 20,
                              check_body=reserved_field_refusal)

    async def run() -> None:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"prompt": "p",
                                                      "kv_transfer_params": {"x": 1}})
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "kv_transfer_params"
            assert seen == [] and admission.in_flight == 0
            ok = await c.post("/v1/completions", json={"prompt": "p"})
            assert ok.status_code == 200 and seen == [{"prompt": "p"}]

    import asyncio

    asyncio.run(run())
