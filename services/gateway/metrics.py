"""The gateway's own Prometheus metrics (served on its /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.route_audit import DEFAULT_WINDOW, RouteAudit

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class GatewayMetrics:
    """Metric families, in a registry of their own (one per gateway)."""

    def __init__(self, audit_window: int = DEFAULT_WINDOW) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.route_audit = RouteAudit(r, audit_window)
        self.requests = Counter("splitserve_gateway_requests", "Requests by route and HTTP status",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("splitserve_gateway_requests_in_flight",
                               "Requests being served", registry=r)
        self.ttft = Histogram("splitserve_gateway_time_to_first_token_seconds",
                              "Request arrival at the gateway to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("splitserve_gateway_inter_token_latency_seconds",
                             "Time between consecutive output steps of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_gateway_request_duration_seconds",
                             "Request arrival at the gateway to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.routes = Counter("splitserve_gateway_routing_decisions",
                              "Routing decisions by policy and outcome", ["policy", "outcome"],
                              registry=r)
        self.predicted_cached_blocks = Histogram(
            "splitserve_gateway_predicted_cached_blocks",
            "Cached prefix (KV blocks) the index predicted on the worker chosen to compute the "
            "prompt", buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.index_lookup = Histogram("splitserve_gateway_index_lookup_seconds",
                                      "Prompt hashing plus the prefix-index lookup in Redis",
                                      buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                               0.01, 0.025, 0.05, 0.1), registry=r)
        self.index_errors = Counter("splitserve_gateway_index_lookup_errors",
                                    "Index lookups that failed, or were skipped because Redis "
                                    "failed lately (routed on load only)", registry=r)
        self.prompt_tokens = Counter("splitserve_gateway_prompt_tokens",
                                     "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("splitserve_gateway_cached_prompt_tokens",
                                     "Prompt tokens no engine computed for the request (prefix-"
                                     "cache hits where the prompt was computed)", registry=r)
        self.completion_tokens = Counter("splitserve_gateway_completion_tokens",
                                         "Tokens generated", registry=r)
        self.slow_clients_cut = Counter(
            "splitserve_gateway_slow_clients_cut",
            "Streaming responses cut because the client took no data for slow_client_timeout_s "
            "(the request was aborted on the workers)", registry=r)
        self.migrations = Counter("splitserve_gateway_request_migrations",
                                  "Requests moved to another decode worker after the one "
                                  "serving them failed", registry=r)
        self.prefill_fallbacks = Counter("splitserve_gateway_prefill_fallbacks",
                                         "Prefills that failed or timed out, computed on the "
                                         "decode worker instead", registry=r)
        self.live_workers = Gauge("splitserve_gateway_live_workers",
                                  "Live workers in the registry, by role", ["role"], registry=r)
