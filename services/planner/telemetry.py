"""The planner's own Prometheus metrics (served on its /metrics, default port 9400)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class PlannerMetrics:
    """Metric families, in a registry of their own (one per planner)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.desired = Gauge("splitserve_planner_desired_replicas",
                             "Pool size the planner wants", ["pool"], registry=r)
        self.recommended = Gauge("splitserve_planner_recommended_replicas",
                                 "Pool size the capacity model estimates (before the gentleness "
                                 "rules)", ["pool"], registry=r)
        self.decisions = Counter("splitserve_planner_decisions",
                                 "Planning decisions by pool, direction and reason",
                                 ["pool", "direction", "reason"], registry=r)
        self.leader = Gauge("splitserve_planner_is_leader",
                            "1 while this planner holds the lease (or runs alone)", registry=r)
        self.ttft = Gauge("splitserve_planner_observed_ttft_p90_seconds",
                          "TTFT p90 of the prefill pool over the window (NaN: no data)",
                          registry=r)
        self.itl = Gauge("splitserve_planner_observed_itl_p90_seconds",
                         "Inter-token latency p90 of the decode pool over the window (NaN: no "
                         "data)", registry=r)
        self.prompt_rate = Gauge("splitserve_planner_observed_prompt_tokens_per_second",
                                 "Prompt tokens computed per second by pool", ["pool"], registry=r)
        self.waiting = Gauge("splitserve_planner_observed_waiting_requests",
                             "Requests queued in the pool's engines", ["pool"], registry=r)
        self.kv_usage = Gauge("splitserve_planner_observed_kv_usage",
                              "Mean KV-cache usage of the pool's workers", ["pool"], registry=r)
        self.steps = Counter("splitserve_planner_steps", "Planning steps by outcome", ["outcome"],
                             registry=r)
        self.kube_errors = Counter("splitserve_planner_kube_errors",
                                   "RayCluster scale calls that failed after their tries",
                                   registry=r)

    def serve(self, host: str, port: int) -> tuple[object, object]:
        """Serve /metrics in a thread; returns (server, thread); `server.shutdown()` stops it."""
        return start_http_server(port, addr=host, registry=self.registry)
