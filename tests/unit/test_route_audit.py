"""The routing audit in figures: the prediction as the engine can hit it, the one-block
tolerance, precision and recall over a sliding window, the Prometheus series; the per-request
ticket (only the computing worker's report counts, once), its log line and span; the route
figures in the access-log line and the request's span."""

from __future__ import annotations

import logging
import math
from typing import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from types import SimpleNamespace

from router.policies import RouteDecision
from router.registry import WorkerInfo, WorkerRole
from router.route_audit import RouteAudit, predicted_tokens
from services import tracing
from services.gateway.audit_ticket import AuditTicket
from services.gateway.route_note import RouteNote
from services.gateway.request_context import RequestContextMiddleware
from services.tracing import TracingConfig

BS = 16


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels or None)
    assert v is not None, name
    return v


def worker(wid: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="127.0.0.1:1", model="m",
                      block_size=BS)


def test_prediction_is_capped_where_the_engine_caps_a_hit() -> None:
    # vLLM computes a prompt's last token: 96 tokens (6 full blocks) hit at most 5 blocks
    assert predicted_tokens(6, BS, 96) == 80
    assert predicted_tokens(6, BS, 97) == 96
    assert predicted_tokens(6, BS, 200) == 96  # the index's figure when it is the smaller
    assert predicted_tokens(0, BS, 200) == 0
    assert predicted_tokens(3, BS, 1) == 0
    with pytest.raises(ValueError):
        predicted_tokens(-1, BS, 10)
    with pytest.raises(ValueError):
        predicted_tokens(1, 0, 10)


def test_one_block_is_tolerated_more_is_a_misprediction() -> None:
    reg = CollectorRegistry()
    audit = RouteAudit(reg)
    assert audit.record(96, 96, BS).verdict == "hit"
    assert audit.record(96, 80, BS).verdict == "hit"   # one block less: a block in flight
    assert audit.record(96, 79, BS).verdict == "over"
    assert audit.record(0, 17, BS).verdict == "under"
    assert audit.record(0, 16, BS).verdict == "hit"
    assert value(reg, "splitserve_gateway_route_mispredictions_total", direction="over") == 1
    assert value(reg, "splitserve_gateway_route_mispredictions_total", direction="under") == 1
    assert value(reg, "splitserve_gateway_route_audited_requests_total") == 5
    assert value(reg, "splitserve_gateway_route_predicted_cached_tokens_total") == 288
    assert value(reg, "splitserve_gateway_route_reported_cached_tokens_total") == 288
    # min per request: 96 + 80 + 79 + 0 + 0
    assert value(reg, "splitserve_gateway_route_matched_cached_tokens_total") == 255
    with pytest.raises(ValueError):
        audit.record(-1, 0, BS)
    with pytest.raises(ValueError):
        RouteAudit(CollectorRegistry(), window=0)


def test_precision_and_recall_over_the_last_requests() -> None:
    reg = CollectorRegistry()
    audit = RouteAudit(reg, window=3)
    precision = lambda: value(reg, "splitserve_gateway_route_hit_precision")  # noqa: E731
    recall = lambda: value(reg, "splitserve_gateway_route_hit_recall")  # noqa: E731
    assert math.isnan(precision()) and math.isnan(recall())  # nothing yet: undefined
    audit.record(0, 0, BS)                     # a cold prompt, correctly cold
    assert audit.precision is None and audit.recall is None
    assert math.isnan(precision())
    audit.record(64, 64, BS)                   # predicted and there
    assert (audit.precision, audit.recall) == (1.0, 1.0) == (precision(), recall())
    audit.record(128, 32, BS)                  # 96 tokens were evicted behind the index's back
    # matched 0 + 64 + 32 = 96 of predicted 192 and of reported 96
    assert (audit.precision, audit.recall) == (0.5, 1.0) == (precision(), recall())
    audit.record(0, 48, BS)                    # the index missed a hit; (0, 0) leaves the window
    # matched 64 + 32 + 0 = 96; predicted 192; reported 144
    assert audit.precision == 0.5 and audit.recall == pytest.approx(96 / 144)
    assert recall() == pytest.approx(2 / 3)
    for _ in range(3):                         # the window forgets
        audit.record(32, 32, BS)
    assert (audit.precision, audit.recall) == (1.0, 1.0)
    # the counters do not forget
    assert value(reg, "splitserve_gateway_route_mispredictions_total", direction="over") == 1
    assert value(reg, "splitserve_gateway_route_mispredictions_total", direction="under") == 1


def test_ticket_counts_the_computing_workers_report_once() -> None:
    reg = CollectorRegistry()
    audit = RouteAudit(reg)
    p, d = worker("p", WorkerRole.PREFILL), worker("d", WorkerRole.DECODE)
    # no prediction (a policy without the index, a forced route, Redis away): no ticket
    assert AuditTicket.of(audit, RouteDecision(decode=d, prefill=p)) is None
    remote = RouteDecision(decode=d, prefill=p, predicted_cached_blocks=4,
                           predicted_cached_tokens=64)
    t = AuditTicket.of(audit, remote)
    assert t is not None and t.fields() == {}
    # the decode worker counts the pulled KV as cached: not what was predicted
    assert not t.offer("d", 200)
    assert t.offer("p", 64)
    assert not t.offer("p", 0)  # once
    assert t.fields() == {"predicted_cached_tokens": 64, "reported_cached_tokens": 64,
                          "route_audit": "hit"}
    assert value(reg, "splitserve_gateway_route_audited_requests_total") == 1
    local = AuditTicket.of(audit, RouteDecision(decode=d, predicted_cached_tokens=32))
    assert local is not None and local.offer("d", 0)  # local prefill: the decode worker's hit
    assert local.record is not None and local.record.verdict == "over"
    # vLLM's EngineCoreOutput: only the first output of a request has prefill_stats
    out = AuditTicket.of(audit, remote)
    assert out is not None
    assert not out.offer_output("p", SimpleNamespace(prefill_stats=None))
    stats = SimpleNamespace(num_local_cached_tokens=16, num_cached_tokens=16)
    assert out.offer_output("p", SimpleNamespace(prefill_stats=stats))
    assert out.record is not None and out.record.verdict == "over"


def test_route_headers_carry_the_audit() -> None:
    audit = RouteAudit(CollectorRegistry())
    route = RouteDecision(decode=worker("w1", WorkerRole.BOTH), reason="aggregated",
                          predicted_cached_tokens=96)
    note = RouteNote(decode="w1", prefill="local", reason="aggregated",
                     audit=AuditTicket.of(audit, route))
    names = [k for k, _ in note.headers()]
    assert b"x-splitserve-predicted-cached-tokens" not in names  # no report yet
    assert note.audit is not None and note.audit.offer("w1", 80)
    headers = dict(note.headers())
    assert headers[b"x-splitserve-decode-worker"] == b"w1"
    assert headers[b"x-splitserve-prefill-worker"] == b"local"
    assert headers[b"x-splitserve-predicted-cached-tokens"] == b"96"
    assert headers[b"x-splitserve-reported-cached-tokens"] == b"80"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    assert tracing.setup(TracingConfig(), "test", exporter=exp)
    yield exp
    tracing.shutdown()


def test_announced_ticket_logs_a_line_and_a_span(exporter: InMemorySpanExporter,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The vLLM front end's per-request record, under the client's trace if it sent one."""
    audit = RouteAudit(CollectorRegistry())
    route = RouteDecision(decode=worker("d", WorkerRole.DECODE),
                          prefill=worker("p", WorkerRole.PREFILL), reason="kv",
                          predicted_cached_tokens=0, ttft_s=0.25,
                          candidates=({"worker": "p", "cached_tokens": 0, "cost": 0.3},))
    parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    t = AuditTicket.of(audit, route, request_id="cmpl-1", announce=True, trace_headers=parent)
    assert t is not None
    with caplog.at_level(logging.INFO, logger="splitserve.route"):
        t.offer("p", 48)
    rec = next(r for r in caplog.records if r.name == "splitserve.route")
    assert "cmpl-1" in rec.getMessage() and "reported 48" in rec.getMessage()
    assert (rec.predicted_cached_tokens, rec.reported_cached_tokens, rec.route_audit,
            rec.prefill_worker) == (0, 48, "under", "p")
    span = next(s for s in exporter.get_finished_spans() if s.name == "route")
    assert span.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert span.attributes["splitserve.predicted_cached_tokens"] == 0
    assert span.attributes["splitserve.reported_cached_tokens"] == 48
    assert span.attributes["splitserve.route_audit"] == "under"
    # the cost model's estimate beside the time the gateway measured, to the same output
    assert rec.estimated_ttft_ms == 250.0 and 0 <= rec.measured_ttft_ms < 1000
    assert "estimated 250 ms to its first output, took" in rec.getMessage()
    assert rec.route_candidates == [{"worker": "p", "cached_tokens": 0, "cost": 0.3}]
    assert span.attributes["splitserve.estimated_ttft_ms"] == 250.0


async def test_access_log_and_span_carry_the_figures(exporter: InMemorySpanExporter,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        return JSONResponse({}, headers={"x-splitserve-decode-worker": "w1",
                                         "x-splitserve-predicted-cached-tokens": "96",
                                         "x-splitserve-reported-cached-tokens": "80"})

    app.add_middleware(RequestContextMiddleware)  # route headers off: the default
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        with caplog.at_level(logging.INFO, logger="splitserve.access"):
            r = await client.post("/v1/completions")
            assert r.status_code == 200 and r.headers["x-request-id"]
            assert not [h for h in r.headers if h.startswith("x-splitserve-")], r.headers
    line = next(r for r in caplog.records if r.name == "splitserve.access")
    assert (line.predicted_cached_tokens, line.reported_cached_tokens) == (96, 80)
    span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert span.attributes["splitserve.predicted_cached_tokens"] == 96
    assert span.attributes["splitserve.reported_cached_tokens"] == 80
    assert span.attributes["splitserve.decode_worker"] == "w1"


async def test_route_headers_are_sent_only_when_asked_for() -> None:
    for on in (False, True):
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions() -> JSONResponse:
            return JSONResponse({}, headers={"x-splitserve-decode-worker": "w1"})

        app.add_middleware(RequestContextMiddleware, route_headers=on)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gw") as client:
            r = await client.post("/v1/completions")
        assert r.headers.get("x-splitserve-decode-worker") == ("w1" if on else None)
