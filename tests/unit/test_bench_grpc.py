"""The load runner over the public gRPC API (bench/api_compare.py compares it with SSE)."""

from __future__ import annotations

from bench.client import ClientConfig, run_workload
from bench.workload import SyntheticConfig
from services.ports import free_port
from tests.support.fake_inference import FakeServer


async def test_grpc_runs_time_every_request() -> None:
    workload = SyntheticConfig(requests=6, isl=12, isl_spread=2, osl=4).build()
    with FakeServer(free_port()) as server:
        cfg = ClientConfig(base_url="http://127.0.0.1:9", model="fake", api="grpc",
                           grpc_target=server.target, concurrency=3)
        run = await run_workload(workload, cfg)
    assert len(run.results) == 6 and run.unsent == 0
    for res, req in zip(run.results, workload.requests):
        assert res.ok, res.error
        words = len((req.prompt or "").split())  # the fake echoes the prompt's words
        assert res.output_tokens == words == res.content_chunks
        assert res.ttft_s is not None and len(res.itl_s) == words - 1
        assert res.prompt_tokens == 3
    assert server.servicer.calls == 6
