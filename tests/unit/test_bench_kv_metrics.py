"""Per-request KV transfer figures of a PD run, from the decode engine's NIXL histograms."""

from __future__ import annotations

import pytest

from bench.engine_metrics import (EngineSnapshot, WorkerCounters, kv_transfer_report,
                                  parse_counters)

PAGE = """\
# HELP vllm:nixl_xfer_time_seconds Histogram of transfer duration for NIXL KV Cache transfers.
# TYPE vllm:nixl_xfer_time_seconds histogram
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.001",model_name="m"} 1.0
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:nixl_xfer_time_seconds_count{engine="0",model_name="m"} 4.0
vllm:nixl_xfer_time_seconds_sum{engine="0",model_name="m"} 0.02
# HELP vllm:nixl_bytes_transferred Histogram of bytes transferred per NIXL KV Cache transfers.
# TYPE vllm:nixl_bytes_transferred histogram
vllm:nixl_bytes_transferred_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:nixl_bytes_transferred_count{engine="0",model_name="m"} 4.0
vllm:nixl_bytes_transferred_sum{engine="0",model_name="m"} 8388608.0
# HELP vllm:nixl_num_descriptors Histogram of number of descriptors per NIXL  KV Cache transfers.
# TYPE vllm:nixl_num_descriptors histogram
vllm:nixl_num_descriptors_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:nixl_num_descriptors_count{engine="0",model_name="m"} 4.0
vllm:nixl_num_descriptors_sum{engine="0",model_name="m"} 40.0
"""


def test_parse_nixl_histograms() -> None:
    c = parse_counters(PAGE)
    assert c["vllm:nixl_xfer_time_seconds_count"] == 4.0
    assert c["vllm:nixl_xfer_time_seconds_sum"] == pytest.approx(0.02)
    assert c["vllm:nixl_bytes_transferred_sum"] == 8388608.0
    assert c["vllm:nixl_num_descriptors_sum"] == 40.0
    assert not any("bucket" in k for k in c)


def test_kv_transfer_report_is_the_decode_side_delta() -> None:
    def snap(decode: dict[str, float], prefill: dict[str, float]) -> EngineSnapshot:
        return EngineSnapshot({"d": WorkerCounters("d", "decode", decode),
                               "p": WorkerCounters("p", "prefill", prefill)})

    before = snap(parse_counters(PAGE), {"vllm:nixl_xfer_time_seconds_count": 99.0})
    after_page = {k: v * 3 for k, v in parse_counters(PAGE).items()}
    rep = kv_transfer_report(before, snap(after_page, {"vllm:nixl_xfer_time_seconds_count": 500}))
    assert rep is not None
    assert rep.transfers == 8 and rep.bytes == 2 * 8388608
    assert rep.mean_mib == pytest.approx(2.0)
    assert rep.mean_ms == pytest.approx(5.0)
    assert rep.gb_s == pytest.approx(2 * 8388608 / 0.04 / 1e9)
    assert rep.mean_descriptors == pytest.approx(10.0)
    aggregated = EngineSnapshot({"b": WorkerCounters("b", "both", {})})
    assert kv_transfer_report(aggregated, aggregated) is None
    idle = kv_transfer_report(before, before)
    assert idle is not None and idle.transfers == 0 and idle.mean_ms is None
    assert idle.mean_descriptors is None
