"""`splitserve bench`: the project's load generator.

Modules, one concern each:

- :mod:`bench.workload`: seeded scenarios that build the list of requests a run sends.
- :mod:`bench.client`: the async HTTP runner (streaming, bounded concurrency, optional rate).
- :mod:`bench.stats`: per-request latencies to percentiles and throughput.
- :mod:`bench.engine_metrics`: the engines' own Prometheus counters, and the prefix hit rate.
- :mod:`bench.report`: the JSON report, ratios against a baseline, the tables, progress.
- :mod:`bench.runner`: one run per target and concurrency (an URL, clusters it starts itself,
  vLLM's own server as a baseline).
- :mod:`bench.vllm_server`: vLLM's OpenAI server with a worker's engine settings and core.
- :mod:`bench.plots`: PNG plots of a report (latency/throughput vs concurrency, CDFs).
- :mod:`bench.cli`: the `splitserve bench` arguments.
- :mod:`bench.kv_transfer`: NIXL transfer bandwidth between two processes vs memcpy.
- :mod:`bench.industry`: guidellm against the gateway, next to `splitserve bench`.
- :mod:`bench.api_compare`: the same workload over gRPC and SSE.
"""
