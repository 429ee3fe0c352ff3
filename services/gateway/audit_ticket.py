"""One routed request's audit, from its route to its engine's report (router/route_audit.py).

The route says which worker computes the prompt and how many of its tokens the index predicted
that worker holds. Any worker's first output of the request may be offered; only the report of
the worker the prediction was about counts, once. So with the KV moving, the prefill worker's
hit is audited and the decode worker's (which counts the transferred KV as cached) is not; a
request whose prefill failed, and whose decode worker computed the prompt instead, is not
audited at all (nothing was predicted about that worker).

Each audited request gets a log line and a span of its own (`announce`), and with route
headers on, the figures travel in the response's headers too (services/gateway/route_note.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from router.policies import RouteDecision
from router.route_audit import AuditRecord, RouteAudit
from services import tracing

log = logging.getLogger("splitserve.route")


class AuditTicket:
    """The pending audit of one request."""

    def __init__(self, audit: RouteAudit, route: RouteDecision, predicted: int,
                 request_id: str = "", trace_headers: Mapping[str, str] | None = None,
                 announce: bool = False) -> None:
        self._audit = audit
        self.route = route
        self.predicted = predicted
        self.record: AuditRecord | None = None
        self._request_id = request_id
        self._trace_headers = trace_headers
        self._announce = announce
        self._started_ns = time.time_ns()
        self._routed_at = time.monotonic()
        self.took_s: float | None = None
        """route to the computing worker's first output, measured here"""

    @classmethod
    def of(cls, audit: RouteAudit, route: RouteDecision, **kw: Any) -> "AuditTicket | None":
        """The ticket of a route, or None when the route predicted nothing."""
        if route.predicted_cached_tokens is None:
            return None
        return cls(audit, route, route.predicted_cached_tokens, **kw)

    def offer(self, worker_id: str, cached_tokens: int) -> bool:
        """`worker_id`'s engine reports `cached_tokens` prompt tokens from its local prefix
        cache. Recorded (True) only the first time, and only from the computing worker."""
        if self.record is not None or worker_id != self.route.computes.worker_id:
            return False
        self.took_s = time.monotonic() - self._routed_at
        self.record = self._audit.record(self.predicted, max(int(cached_tokens), 0),
                                         self.route.computes.block_size)
        if self._announce:
            self._log_and_trace()
        return True

    def offer_output(self, worker_id: str, output: Any) -> bool:
        """Offer a vLLM `EngineCoreOutput`: the first one of a request carries its
        `prefill_stats` (`num_local_cached_tokens`: the engine's own prefix-cache hit)."""
        stats = getattr(output, "prefill_stats", None)
        if stats is None:
            return False
        return self.offer(worker_id, stats.num_local_cached_tokens)

    def fields(self) -> dict[str, Any]:
        """The audit as log fields / span attributes (empty until recorded)."""
        if self.record is None:
            return {}
        out: dict[str, Any] = {"predicted_cached_tokens": self.record.predicted,
                               "reported_cached_tokens": self.record.reported,
                               "route_audit": self.record.verdict}
        if self.route.ttft_s is not None and self.took_s is not None:
            out["estimated_ttft_ms"] = round(self.route.ttft_s * 1000, 1)
            out["measured_ttft_ms"] = round(self.took_s * 1000, 1)
        return out

    def _log_and_trace(self) -> None:
        r = self.route
        where = {"decode_worker": r.decode.worker_id,
                 "prefill_worker": r.prefill.worker_id if r.prefill else "local",
                 "route_reason": r.reason}
        fields = self.fields()
        if log.isEnabledFor(logging.INFO):  # the candidates' rows are formatted only for it
            timing = (f"; estimated {fields['estimated_ttft_ms']:.0f} ms to its first output, "
                      f"took {fields['measured_ttft_ms']:.0f} ms"
                      if "estimated_ttft_ms" in fields else "")
            log.info("request %s routed to %s (prefill %s, %s): predicted %d cached tokens, "
                     "engine reported %d (%s)%s", self._request_id, where["decode_worker"],
                     where["prefill_worker"], where["route_reason"],
                     fields["predicted_cached_tokens"], fields["reported_cached_tokens"],
                     fields["route_audit"], timing,
                     extra={**where, **fields, "route_candidates": list(r.candidates)})
        if tracing.enabled():
            ctx = tracing.extract(dict(self._trace_headers)) if self._trace_headers else None
            span = tracing.tracer().start_span(
                "route", context=ctx, start_time=self._started_ns, attributes={
                    "splitserve.request_id": self._request_id,
                    **{f"splitserve.{k}": v for k, v in {**where, **fields}.items()}})
            span.end()
