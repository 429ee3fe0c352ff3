"""The routing audit catches a prefix evicted behind the index's back, on a real cluster with a
small KV cache (`--kv-blocks`-sized, on the prefill worker).

The index learns an eviction from the engine's `BlockRemoved` event, which vLLM publishes
after the step that evicted the block has run. A request routed in between is routed for a
cache its worker no longer holds by the time it is scheduled: here a long prompt X that needs
every block of the prefill engine's cache arrives first and is prefilled in many small chunks
(`max_num_batched_tokens=64`, one request at a time), evicting the cached prefix P in its last
chunks, while a request for P, routed meanwhile with P in the index, waits behind it. The
engine then reports no hit where the index predicted the whole prefix: an `over`
misprediction in the counter, the log line and the response headers. The same prefix asked
for again once the index has caught up is predicted exactly.

Disaggregated, one prefill and one decode worker, and `--kv-local-prefill-tokens 0`: every
prompt is computed by the prefill worker (the decode worker holds what it received, but never
prefills), and the route is not forced, so each request is looked up and audited.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.e2e.conftest import PROMPT_TOKENS_DETAILS
from tests.support.cluster import RunningCluster, start_test_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]
MODEL = "splitserve-tiny"
BS = 32  # `up`'s default block size
PREFILL_BLOCKS = 48
USABLE = (PREFILL_BLOCKS - 1) * BS  # vLLM keeps one block back (its null block)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory, model_dir: Path
                ) -> Iterator[RunningCluster]:
    cluster = start_test_cluster([
        "--mode", "disaggregated", "--prefill", "1", "--decode", "1",
        "--kv-local-prefill-tokens", "0", "--route-headers",
        "--max-model-len", str(USABLE),  # one longest prompt fills the prefill worker's cache
        f"--frontend-arg={PROMPT_TOKENS_DETAILS}",
        "--prefill-engine-arg", f"num_gpu_blocks_override={PREFILL_BLOCKS}",
        "--prefill-engine-arg", "max_num_batched_tokens=64",
        "--prefill-engine-arg", "max_num_seqs=1"],
        tmp_path_factory.mktemp("audit-eviction") / "run")
    try:
        yield cluster
    finally:
        code = cluster.stop()
        if cluster.alive_descendants():
            cluster.kill()
        assert code == 0, f"splitserve up exited {code}"


def post(base: str, ids: list[int]) -> httpx.Response:
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def audited(r: httpx.Response) -> tuple[int, int]:
    return (int(r.headers["x-splitserve-predicted-cached-tokens"]),
            int(r.headers["x-splitserve-reported-cached-tokens"]))


def mispredictions(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("splitserve_gateway_route_mispredictions_total{"):
            name, val = line.rsplit(" ", 1)
            out[name.split('"')[1]] = float(val)
    return out


def test_an_eviction_between_lookup_and_schedule_is_an_over_misprediction(
        small_cache: RunningCluster) -> None:
    base = small_cache.http
    rng = random.Random(16)

    def fresh(n: int) -> list[int]:  # token ids no earlier request used
        return [rng.randrange(5, 8192) for _ in range(n)]

    seen = []
    for attempt in range(3):
        prefix = fresh(8 * BS)
        first = post(base, prefix + fresh(5))
        prefill_worker = first.headers["x-splitserve-prefill-worker"]
        assert prefill_worker != "local"
        # the index learns P: the same prefix is predicted (and hit) in full
        deadline = time.monotonic() + 15
        while audited(again := post(base, prefix + fresh(3)))[0] < 8 * BS:
            assert time.monotonic() < deadline, "the index never learnt the prefix"
            time.sleep(0.2)
        assert audited(again) == (8 * BS, 8 * BS)
        assert again.headers["x-splitserve-prefill-worker"] == prefill_worker

        before = mispredictions(base)
        # X: every block of the prefill engine's cache (its last one partly), so its last
        # chunks evict P; sent first, then P again while X is being prefilled
        x = fresh(USABLE - 14)
        done = threading.Event()
        threading.Thread(target=lambda: (post(base, x), done.set()), daemon=True).start()
        time.sleep(0.05)
        r = post(base, prefix + fresh(3))
        assert done.wait(60)
        predicted, reported = audited(r)
        after = mispredictions(base)
        seen.append((predicted, reported))
        if predicted - reported > BS:  # routed for P, scheduled after P was evicted
            assert predicted == 8 * BS and reported < predicted
            assert after["over"] == before["over"] + 1
            assert after["under"] == before["under"]
            logs = (small_cache.run_dir / "gateway.log").read_text()
            assert (f"predicted {predicted} cached tokens, engine reported {reported} (over)"
                    in logs)
            # the index catches up with the eviction: P is predicted as it is held again
            time.sleep(1.5)
            p, q = audited(post(base, prefix + fresh(3)))
            assert abs(p - q) <= BS, (p, q)
            return
        # P2 overtook X on the way to the engine (and hit): nothing was evicted under it
        assert after == before, (seen, before, after)
    pytest.fail(f"no request was routed between X's eviction and the index update: {seen}")


def test_workers_publish_the_engine_links_requests(small_cache: RunningCluster) -> None:
    """The router's load figures count the requests that come over the engine link (the vLLM
    front end's path): a long decode shows on the decode worker's published batch while it
    streams, and nowhere once it has finished."""
    import asyncio

    from router.redis_client import redis_client
    from router.registry import WorkerRegistry

    def loads() -> dict[str, dict]:
        async def read() -> dict[str, dict]:
            client = redis_client(small_cache.redis_url)
            try:
                return {w.role.value: w.load.model_dump()
                        for w in await WorkerRegistry(client).live_workers()}
            finally:
                await client.aclose()
        return asyncio.run(read())

    seen = []
    body = {"model": MODEL, "prompt": "Count the blocks of the cache, slowly.",
            "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{small_cache.http}/v1/completions", json=body,
                      timeout=120) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i % 25 == 10:
                seen.append(loads()["decode"]["decoding_reqs"])
    assert 1 in seen, seen
    deadline = time.monotonic() + 10
    while loads()["decode"]["decoding_reqs"] != 0:
        assert time.monotonic() < deadline, "the finished request still counts"
        time.sleep(0.3)
