"""Prefix hit rate from the engines' Prometheus counters."""

from __future__ import annotations

import pytest

from bench.engine_metrics import (EngineSnapshot, WorkerCounters, parse_counters,
                                  prefix_cache_report)

PAGE = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 24.0
# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 400.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 600.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 0.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 77.0
"""


def test_parse_counters_sums_label_sets() -> None:
    c = parse_counters(PAGE)
    assert c["vllm:prompt_tokens_total"] == 1024.0
    assert c["vllm:prompt_tokens_by_source_total{local_compute}"] == 400.0
    assert c["vllm:prompt_tokens_by_source_total{local_cache_hit}"] == 600.0
    assert c["vllm:prefix_cache_hits_total"] == 600.0
    assert c["vllm:prefix_cache_queries_total"] == 1000.0
    assert not any("generation" in k for k in c)


def counters(prompt: float, compute: float, hit: float, external: float) -> dict[str, float]:
    return {"vllm:prompt_tokens_total": prompt,
            "vllm:prompt_tokens_by_source_total{local_compute}": compute,
            "vllm:prompt_tokens_by_source_total{local_cache_hit}": hit,
            "vllm:prompt_tokens_by_source_total{external_kv_transfer}": external,
            "vllm:prefix_cache_queries_total": prompt, "vllm:prefix_cache_hits_total": hit}


def snap(**workers: tuple[str, dict[str, float]]) -> EngineSnapshot:
    return EngineSnapshot({w: WorkerCounters(w, role, v) for w, (role, v) in workers.items()})


def test_disaggregated_counts_each_prompt_once() -> None:
    """Two requests of 1000 tokens: one prefilled remotely (prefill hit 600; decode had 200
    locally and pulled 800), one prefilled locally on decode (hit 900, computed 100)."""
    before = snap(p=("prefill", counters(50, 50, 0, 0)), d=("decode", counters(50, 50, 0, 0)))
    after = snap(p=("prefill", counters(1050, 450, 600, 0)),
                 d=("decode", counters(2050, 150, 1100, 800)))
    rep = prefix_cache_report(before, after)
    assert rep.served_prompt_tokens == 2000  # decode only: the prefill worker's copy not again
    assert rep.computed_prompt_tokens == 500  # 400 on prefill + 100 on decode
    assert rep.hit_rate == pytest.approx(0.75)  # (600 prefill hits + 900 local) / 2000
    assert rep.by_role["decode"].external_kv_transfer == 800
    assert rep.by_role["prefill"].prefix_cache_hits == 600
    assert rep.by_role["prefill"].workers == 1


def test_aggregated_equals_engine_hit_rate_and_edge_cases() -> None:
    before = snap(a=("both", counters(0, 0, 0, 0)))
    after = snap(a=("both", counters(1000, 250, 750, 0)), new=("both", counters(10, 10, 0, 0)))
    rep = prefix_cache_report(before, after)
    assert rep.hit_rate == pytest.approx(1 - 260 / 1010)
    assert rep.by_role["both"].workers == 2
    # nothing served: no rate; a restarted engine (counter went down) counts from zero
    assert prefix_cache_report(before, before).hit_rate is None
    restarted = snap(a=("both", counters(100, 50, 50, 0)))
    big = snap(a=("both", counters(5000, 4000, 1000, 0)))
    assert prefix_cache_report(big, restarted).hit_rate == pytest.approx(0.5)


def test_a_single_server_is_scraped_at_its_metrics_url_as_one_both_engine() -> None:
    """vLLM's own server (the `--target vllm` baseline) has no registry: its one engine is read
    at the URL it is given, over HTTP, and counts as a worker that prefills and decodes."""
    import asyncio

    from prometheus_client import CollectorRegistry, Counter, start_http_server

    from bench.engine_metrics import scrape_settled, server_endpoints
    from services.ports import free_port

    registry = CollectorRegistry()
    prompt = Counter("vllm:prompt_tokens", "prompt tokens", ["engine"], registry=registry)
    by_source = Counter("vllm:prompt_tokens_by_source", "by source", ["engine", "source"],
                        registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        before = asyncio.run(scrape_settled(server_endpoints(url), settle_s=0.05))
        assert list(before.workers) == ["vllm"] and before.workers["vllm"].role == "both"
        prompt.labels("0").inc(1000)
        by_source.labels("0", "local_compute").inc(300)
        by_source.labels("0", "local_cache_hit").inc(700)
        after = asyncio.run(scrape_settled(server_endpoints(url), settle_s=0.05))
        rep = prefix_cache_report(before, after)
        assert rep.hit_rate == pytest.approx(0.7) and rep.errors == []
        assert rep.by_role["both"].workers == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    # the server gone: an error in the report, not an exception
    gone = asyncio.run(scrape_settled(server_endpoints(url), settle_s=0.05, max_wait_s=0.1))
    assert gone.workers == {} and gone.errors and gone.errors[0].startswith("vllm: ")
