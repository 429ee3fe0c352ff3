"""`splitserve bench`: the project's load generator.

Modules, one concern each:

- :mod:`bench.workload`: seeded scenarios that build the list of requests a run sends.
- :mod:`bench.client`: the async HTTP runner (streaming, bounded concurrency, optional rate).
- :mod:`bench.stats`: per-request latencies to percentiles and throughput.
- :mod:`bench.engine_metrics`: the engines' own Prometheus counters, and the prefix hit rate.
- :mod:`bench.report`: the JSON report, ratios against a baseline, the table, progress.
- :mod:`bench.runner`: one run per target (an URL, or clusters it starts itself).
- :mod:`bench.cli`: the `splitserve bench` arguments.
"""
