"""A real vLLM engine's KV events, hashed and indexed by the router, end to end.

A vLLM CPU engine (offline ``LLM``, built-in tiny model, block size 32, prefix caching, KV events
on an ipc endpoint with a replay endpoint) runs in a subprocess started with PYTHONHASHSEED=0. The
test follows its events with an :class:`~router.index_updater.IndexUpdater` into a private Redis
and with a raw :class:`~router.kv_events.KVEventSubscriber`, feeds it prompts one at a time over
stdin, and checks that

* every hash the engine publishes equals ``BlockHasher(32, "sha256", "0")`` on the request's tokens
  (all of a prompt's full blocks among them),
* the index reports the prompt's full blocks as the worker's longest prefix, and
* the index's prediction for a new prompt equals the cache hit the engine then reports, and
* ``reset_prefix_cache()`` (AllBlocksCleared) empties the worker's index entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.block_hash import BlockHasher
from router.index_updater import IndexUpdater, IndexUpdaterConfig
from router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEventSubscriber, SubscriberConfig
from router.prefix_index import PrefixIndex

import vllm  # noqa: F401  (installed by scripts/install.sh; a missing vLLM must fail)

BLOCK = 32  # the CPU attention backend wants a multiple of 32 for the tiny model (16 is refused)
WORKER = "engine-0"

ENGINE_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
model, endpoint, replay = sys.argv[1:4]
llm = LLM(
    model=model, dtype="float32", enforce_eager=True, block_size=int(sys.argv[4]), enable_prefix_caching=True,
    max_model_len=1024, max_num_seqs=4, seed=0,
    kv_events_config={"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
                      "replay_endpoint": replay, "topic": "kv"},
)
print("READY", flush=True)
params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
for line in sys.stdin:
    if line.strip() == "RESET":
        print("RESULT " + json.dumps({"reset": llm.reset_prefix_cache()}), flush=True)
        continue
    ids = json.loads(line)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    print("RESULT " + json.dumps({
        "prompt_token_ids": list(out.prompt_token_ids),
        "output_token_ids": list(out.outputs[0].token_ids),
        "num_cached_tokens": out.num_cached_tokens,
    }), flush=True)
"""


class Engine:
    """The engine subprocess, driven one prompt at a time over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    async def _line(self, prefix: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not raw:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"engine exited before {prefix!r}; log tail:\n{tail}")
            line = raw.decode()
            if line.startswith(prefix):
                return line[len(prefix):]

    async def wait_ready(self) -> None:
        await self._line("READY", timeout=300)

    async def run(self, prompt: list[int] | str) -> dict[str, Any]:
        """Generate for ``prompt`` (token ids), or send a command such as ``"RESET"``."""
        assert self.proc.stdin is not None
        line = prompt if isinstance(prompt, str) else json.dumps(prompt)
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()
        return dict(json.loads(await self._line("RESULT ", timeout=120)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.controller.builtin_model import ensure_builtin_model

    return ensure_builtin_model(tmp_path_factory.mktemp("models"), "tiny")


@contextlib.asynccontextmanager
async def start_engine(model: Path, workdir: Path, endpoint: str, replay: str) -> AsyncIterator[Engine]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
        VLLM_CACHE_ROOT=str(workdir / "vllm-cache"), TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor"),
        HF_HOME=str(workdir / "hf"), VLLM_LOGGING_LEVEL="WARNING",
    )
    env.pop("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", None)
    log_path = workdir / "engine.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ENGINE_SCRIPT, str(model), endpoint, replay, str(BLOCK),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, env=env, cwd=workdir,
    )
    try:
        yield Engine(proc, log_path)
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()  # our own child, by its PID
                await proc.wait()
        log.close()


async def _collect(sub: KVEventSubscriber, sink: list[EventBatch]) -> None:
    while True:
        item = await sub.next()
        assert isinstance(item, EventBatch), f"unexpected {item!r}"
        sink.append(item)


async def _settle(updater: IndexUpdater, raw: list[EventBatch], quiet_s: float = 1.0) -> None:
    """Wait until both consumers have seen the same number of batches and nothing new arrives."""
    last = -1
    for _ in range(int(30 / 0.25)):
        await asyncio.sleep(0.25)
        n = len(raw)
        if n == updater.stats.batches + updater.stats.resyncs and n == last:
            await asyncio.sleep(quiet_s)
            if len(raw) == n:
                return
        last = n
    raise AssertionError("KV events did not settle")


async def test_engine_hashes_match_router_and_index(tmp_path: Path, model_dir: Path, r: aioredis.Redis) -> None:
    endpoint = f"ipc://{tmp_path}/kv.sock"
    replay = f"ipc://{tmp_path}/kv-replay.sock"
    hasher = BlockHasher(BLOCK, "sha256", hash_seed="0")
    index = PrefixIndex(r)
    await r.sadd("splitserve:workers", WORKER)
    await r.set(f"splitserve:worker:{WORKER}:alive", "1")

    # Subscribe before the engine binds (ipc connect-before-bind is fine), so nothing is missed.
    updater = IndexUpdater(
        index,
        IndexUpdaterConfig(worker_id=WORKER, subscriber=SubscriberConfig(endpoint, replay, topic="kv")),
        hasher=hasher,
    )
    updater.start()
    raw_sub = KVEventSubscriber(SubscriberConfig(endpoint, replay, topic="kv"))
    raw_sub.connect()
    raw: list[EventBatch] = []
    collector = asyncio.create_task(_collect(raw_sub, raw))

    rng = random.Random(0)
    shared = [rng.randrange(5, 8000) for _ in range(4 * BLOCK)]  # 4 full shared blocks
    prompts = [
        shared + [rng.randrange(5, 8000) for _ in range(BLOCK * 2 + 5)],  # 6 full blocks + 5 tokens
        shared + [rng.randrange(5, 8000) for _ in range(BLOCK + 3)],  # shares 4 blocks with prompt 0
        shared[: 2 * BLOCK] + [rng.randrange(5, 8000) for _ in range(BLOCK * 3)],  # shares 2 blocks
        [rng.randrange(5, 8000) for _ in range(BLOCK * 3 - 1)],  # unrelated, 2 full blocks
    ]
    results: list[dict[str, Any]] = []
    predictions: list[int] = []
    try:
        async with start_engine(model_dir, tmp_path, endpoint, replay) as engine:
            await engine.wait_ready()
            for prompt in prompts:
                # The router's prediction of this prompt's cache hit, from the index alone.
                predicted = (await index.longest_prefixes(hasher.block_hashes(prompt))).get(WORKER, -1)
                predictions.append(predicted)
                results.append(await engine.run(prompt))
                await _settle(updater, raw)
                # After the run, the index holds every full block of the prompt on this worker.
                n_full = len(prompt) // BLOCK
                assert await index.longest_prefixes(hasher.block_hashes(prompt)) == {WORKER: n_full}
            assert await index.worker_block_count(WORKER) > 0
            # reset_prefix_cache() publishes AllBlocksCleared: the worker's entries all go.
            # vLLM queues the event and publishes it with the next engine step: run a prompt too
            # short to fill a block.
            assert (await engine.run("RESET"))["reset"] is True
            await engine.run([rng.randrange(5, 8000) for _ in range(BLOCK // 2)])
            await _settle(updater, raw)
            assert await index.worker_block_count(WORKER) == 0
            assert await index.longest_prefixes(hasher.block_hashes(prompts[0])) == {WORKER: 0}
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        raw_sub.close()
        await updater.stop()

    # 1. Every published hash is reproduced by the router's hasher.
    expected_all: set[int] = set()
    prompt_hashes: set[int] = set()
    for res in results:
        prompt_hashes.update(hasher.block_hashes(res["prompt_token_ids"]))
        expected_all.update(hasher.block_hashes(res["prompt_token_ids"] + res["output_token_ids"]))
    published: list[int] = []
    stored_events = 0
    for batch in raw:
        for event in batch.events:
            if isinstance(event, BlockStored):
                stored_events += 1
                assert event.block_size == BLOCK
                assert len(event.token_ids) == BLOCK * len(event.block_hashes)
                published.extend(event.block_hashes)  # type: ignore[arg-type]
            else:
                assert isinstance(event, (BlockRemoved, AllBlocksCleared))
    assert any(isinstance(e, AllBlocksCleared) for b in raw for e in b.events)
    assert stored_events > 0
    unmatched = [h for h in published if h not in expected_all]
    assert not unmatched, f"{len(unmatched)}/{len(published)} published hashes not reproduced"
    assert prompt_hashes <= set(published)  # every full prompt block was announced
    assert updater.stats.hash_checks > 0 and updater.stats.hash_mismatches == 0
    assert raw_sub.stats.gaps == 0 and raw_sub.stats.resyncs == 0

    # 2. The index's prediction equals the engine's actual prefix-cache hit.
    hits = [res["num_cached_tokens"] // BLOCK for res in results]
    assert predictions == [0, 4, 2, 0]
    assert hits == predictions, (hits, predictions)
    print(f"\npublished={len(published)} hashes in {stored_events} BlockStored events, all matched; "
          f"prompt blocks={len(prompt_hashes)}; predicted hits={predictions}, engine hits={hits}")
