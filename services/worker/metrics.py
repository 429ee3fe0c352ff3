"""A worker's own Prometheus metrics, served next to vLLM's on the worker's metrics endpoint.

The worker is identified by its scrape target (instance / pod); `splitserve_worker_info` carries
its id, role and model as labels for joins, e.g.
`vllm:num_requests_running * on(instance) group_left(role, worker_id) splitserve_worker_info`.

KV transfer figures come from the KV connector's own statistics (vLLM's NixlConnector measures
every NIXL transfer it makes: duration, bytes, descriptors), delivered with each engine step's
scheduler stats; one observation per transfer. Transfers are reads by the decode worker, so
these grow on decode workers.
"""

from __future__ import annotations

from typing import Any, Mapping, get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from services.worker.kv_params_signing import Reason

# 16 KiB .. 16 GiB, x4 steps (one KV block of a small model is tens of KiB; a long prompt of a
# large model, GiBs)
BYTES_BUCKETS = tuple(float(1 << (14 + 2 * i)) for i in range(11))
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0)


class WorkerMetrics:
    """The splitserve_worker_* families of one worker process."""

    def __init__(self, worker_id: str, role: str, model: str,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.info = Gauge("splitserve_worker_info", "This worker: id, role, model (always 1)",
                          ["worker_id", "role", "model"], registry=registry)
        self.info.labels(worker_id, role, model).set(1)
        self.kv_transfer_bytes = Histogram(
            "splitserve_worker_kv_transfer_bytes",
            "Bytes of KV cache moved by one KV transfer (NIXL read) into this worker",
            buckets=BYTES_BUCKETS, registry=registry)
        self.kv_transfer_seconds = Histogram(
            "splitserve_worker_kv_transfer_seconds",
            "Duration of one KV transfer (NIXL read), from post to completion",
            buckets=SECONDS_BUCKETS, registry=registry)
        self.kv_transfer_failures = Counter(
            "splitserve_worker_kv_transfer_failures",
            "KV transfers, handshakes or notifications that failed", registry=registry)
        self.kv_lease_expired = Counter(
            "splitserve_worker_kv_lease_expired",
            "Requests whose held KV blocks expired unread (counted on prefill workers)",
            registry=registry)
        self.kv_params_refused = Counter(
            "splitserve_worker_kv_params_refused",
            "KV transfer parameters refused by this (decode) worker, by reason: unsigned, "
            "forged, expired, replayed (the prompt was computed here instead; "
            "docs/security.md)", ["reason"], registry=registry)
        for reason in get_args(Reason):  # every reason shows, at 0 until it happens
            self.kv_params_refused.labels(reason)

    def kv_params_refused_by(self, reason: Reason) -> None:
        """Count KV transfer parameters this worker refused (forged, expired, replayed)."""
        self.kv_params_refused.labels(reason).inc()

    def observe_connector_stats(self, data: Mapping[str, Any]) -> None:
        """Record one step's KV connector statistics (vLLM's KVConnectorStats data: lists of
        per-transfer observations, keys as NixlKVConnectorStats has them)."""
        for n in data.get("bytes_transferred", ()):
            self.kv_transfer_bytes.observe(float(n))
        for s in data.get("transfer_duration", ()):
            self.kv_transfer_seconds.observe(float(s))
        failures = sum(len(data.get(k, ())) for k in (
            "num_failed_transfers", "num_failed_handshakes", "num_failed_notifications"))
        if failures:
            self.kv_transfer_failures.inc(failures)
        if expired := len(data.get("num_kv_expired_reqs", ())):
            self.kv_lease_expired.inc(expired)
