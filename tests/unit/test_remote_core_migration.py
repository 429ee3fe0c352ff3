"""The gateway's remote engine core: the prefill -> decode hand-off, and a request moved off a
decode worker that fails under it; its dispatch ledger and its request timeout. Real ZeroMQ
engine links to scripted worker ends (ROUTER sockets that answer with vLLM's own msgpack
EngineCoreOutputs), vLLM's own request and output types. The e2e suite kills real workers
(tests/e2e/test_vllm_frontend.py, test_healing.py); this one pins down what each failure does."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from types import SimpleNamespace
from typing import Any, Iterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from router.dispatch_ledger import DispatchLedger
from router.policies import RouteDecision
from services.gateway.config import MigrationConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.route_stage import RouteStage, WorkerUnavailable
from services.link import ADD, LOST, OUTPUTS, LinkAuthenticator, LinkKeys
from tests.support.cluster import TEST_SECRET


class ScriptedWorker:
    """The worker end of one engine link: records the requests it gets, sends what it is told."""

    def __init__(self, worker_id: str) -> None:
        from vllm.v1.engine import EngineCoreRequest
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        self.info = SimpleNamespace(worker_id=worker_id, link_address="", block_size=16)
        keys = LinkKeys.derive(TEST_SECRET)  # the real link's CURVE and ZAP check
        self.ctx = ctx = zmq.asyncio.Context()  # one ZAP handler per context, as on a worker
        self.auth = LinkAuthenticator(ctx, keys)
        self.auth.start()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        keys.secure_server(self.sock)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.info.link_address = f"127.0.0.1:{port}"
        self.requests: asyncio.Queue = asyncio.Queue()
        self.gateway: bytes | None = None
        self._decoder = MsgpackDecoder(EngineCoreRequest)
        self._encoder = MsgpackEncoder()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            self.gateway = frames[0].bytes
            if frames[1].bytes == ADD:
                await self.requests.put(self._decoder.decode(frames[2:]))

    async def next_request(self) -> Any:
        return await asyncio.wait_for(self.requests.get(), 10)

    async def step(self, request_id: str, tokens: list[int], finished: bool = False,
                   kv_transfer_params: dict[str, Any] | None = None) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

        out = EngineCoreOutput(request_id=request_id, new_token_ids=tokens,
                               finish_reason=FinishReason.LENGTH if finished else None,
                               kv_transfer_params=kv_transfer_params)
        assert self.gateway is not None
        await self.sock.send_multipart(
            [self.gateway, OUTPUTS, *self._encoder.encode(EngineCoreOutputs(outputs=[out]))],
            copy=False)

    async def lose(self, request_ids: list[str]) -> None:
        assert self.gateway is not None
        await self.sock.send_multipart(
            [self.gateway, LOST, msgspec.msgpack.encode([request_ids, "engine died"])])

    def die(self) -> None:
        self._reader.cancel()
        self.sock.close(linger=0)

    def stop(self) -> None:
        self.die()
        self.auth.stop()
        self.ctx.term()


class OneAtATime:
    """The route stage: the first worker not excluded, decode only (or with `prefill`, that
    worker's prefill first); its ledger and `sent` are the real route stage's."""

    sent = RouteStage.sent
    ledger: DispatchLedger

    def __init__(self, workers: list[ScriptedWorker], migration: MigrationConfig) -> None:
        self.workers = workers
        self.migration = migration
        self.metrics = GatewayMetrics()
        self.ledger = DispatchLedger()
        self.prefill: ScriptedWorker | None = None

    def audit_ticket(self, route: Any, request_id: str, **_: Any) -> None:
        return None  # no prefix index here: nothing predicted, nothing to audit

    async def route(self, token_ids: list[int], exclude: frozenset[str] = frozenset(),
                    cache_salt: str | None = None) -> Any:
        for w in self.workers:
            if w.info.worker_id not in exclude:
                return RouteDecision(decode=w.info, prefill=self.prefill and self.prefill.info,
                                     prompt_blocks=tuple(token_ids))  # a "block" per token
        raise WorkerUnavailable("no decode worker left")


class Directory:
    def __init__(self, workers: list[ScriptedWorker]) -> None:
        self.all = workers
        self.secret = TEST_SECRET
        self.in_flight: dict[str, int] = defaultdict(int)

    @property
    def workers(self) -> list[Any]:
        return [w.info for w in self.all]

    @contextlib.contextmanager
    def track(self, *workers: Any) -> Iterator[None]:
        yield


def request(request_id: str, prompt: list[int], max_tokens: int, **sampling: Any) -> Any:
    import time

    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=prompt, mm_features=None,
        sampling_params=SamplingParams(max_tokens=max_tokens, **sampling), pooling_params=None,
        arrival_time=time.time(), lora_request=None, cache_salt=None, data_parallel_rank=None)


async def outputs_until_finished(core: Any, request_id: str) -> tuple[list[int], Any]:
    tokens: list[int] = []
    while True:
        batch = await asyncio.wait_for(core.get_output_async(), 15)
        for out in batch.outputs:
            assert out.request_id == request_id  # the front end's id, whatever the wire id
            tokens += out.new_token_ids
            if out.finish_reason is not None:
                return tokens, out.finish_reason


@contextlib.asynccontextmanager
async def cluster(n: int, request_timeout_s: float = 600.0, **migration: Any):
    from services.gateway.remote_core import RemoteEngineCore

    workers = [ScriptedWorker(f"decode-{k}") for k in range(n)]
    flow = OneAtATime(workers, MigrationConfig(**migration))
    directory = Directory(workers)
    core = RemoteEngineCore(directory, flow,  # type: ignore[arg-type]
                            request_timeout_s=request_timeout_s)
    try:
        yield core, workers, flow, directory
    finally:
        core.shutdown()
        for w in workers:
            with contextlib.suppress(Exception):
                w.stop()


def migrations(flow: OneAtATime) -> float:
    return flow.metrics.migrations._value.get()


def test_a_dropped_link_moves_the_request_with_its_tokens() -> None:
    """The worker's process dies (its socket closes): the request goes on on the next worker as
    the prompt plus the tokens generated so far, for the tokens still wanted, under a new id;
    the front end sees one request's outputs, in order."""
    async def main() -> None:
        async with cluster(2) as (core, (a, b), flow, directory):
            await core.add_request_async(request("r1", [1, 2, 3], 6, temperature=0.0))
            got = await a.next_request()
            assert (got.request_id, got.prompt_token_ids) == ("r1", [1, 2, 3])
            await a.step("r1", [10])
            await a.step("r1", [11])
            first = []
            while len(first) < 2:
                first += (await asyncio.wait_for(core.get_output_async(), 10)).outputs
            assert [o.new_token_ids for o in first] == [[10], [11]]
            assert directory.in_flight == {"decode-0": 1}
            pending = flow.ledger.pending_prefixes  # the prompt being computed, per worker
            assert pending([1, 2, 3], ["decode-0", "decode-1"]) == {"decode-0": 3}
            a.die()
            moved = await b.next_request()
            assert moved.request_id == "r1.m1"
            assert moved.prompt_token_ids == [1, 2, 3, 10, 11]
            assert moved.sampling_params.max_tokens == 4
            assert directory.in_flight == {"decode-1": 1}
            assert pending([1, 2, 3], ["decode-0", "decode-1"]) == {"decode-1": 3}
            await b.step("r1.m1", [12, 13])
            await b.step("r1.m1", [14, 15], finished=True)
            tokens, reason = await outputs_until_finished(core, "r1")
            assert tokens == [12, 13, 14, 15] and reason.name == "LENGTH"
            assert migrations(flow) == 1 and directory.in_flight == {}
            assert pending([1, 2, 3], ["decode-0", "decode-1"]) == {}

    asyncio.run(main())


def test_a_lost_engine_moves_its_requests_and_late_outputs_of_the_old_worker_are_dropped(
        ) -> None:
    async def main() -> None:
        async with cluster(2) as (core, (a, b), flow, _):
            await core.add_request_async(request("r2", [5, 6], 3, temperature=0.0,
                                                 min_tokens=2))
            await a.next_request()
            await a.step("r2", [20])
            assert (await asyncio.wait_for(core.get_output_async(), 10)).outputs[0] \
                .new_token_ids == [20]
            await a.lose(["r2"])
            moved = await b.next_request()
            assert moved.prompt_token_ids == [5, 6, 20]
            assert (moved.sampling_params.max_tokens, moved.sampling_params.min_tokens) == (2, 1)
            await a.step("r2", [99])  # the old worker, too late: not the request's any more
            await b.step("r2.m1", [21, 22], finished=True)
            tokens, reason = await outputs_until_finished(core, "r2")
            assert tokens == [21, 22] and reason.name == "LENGTH"
            assert migrations(flow) == 1

    asyncio.run(main())


@pytest.mark.parametrize("sampling", [
    {"temperature": 1.0, "seed": 3},
    {"temperature": 0.0, "presence_penalty": 0.5},
])
def test_a_request_that_cannot_continue_as_itself_ends_with_an_error(
        sampling: dict[str, Any]) -> None:
    """Seeded sampling, penalties on the output so far: after a token, moving would change the
    request; it ends with vLLM's ERROR finish reason (a 500) instead of a wrong output."""
    async def main() -> None:
        async with cluster(2) as (core, (a, b), flow, directory):
            await core.add_request_async(request("r3", [7], 5, **sampling))
            await a.next_request()
            await a.step("r3", [30])
            await asyncio.wait_for(core.get_output_async(), 10)
            a.die()
            tokens, reason = await outputs_until_finished(core, "r3")
            assert tokens == [] and reason.name == "ERROR"
            assert b.requests.empty() and migrations(flow) == 0 and directory.in_flight == {}

    asyncio.run(main())


def test_a_request_with_no_token_yet_starts_over_whatever_its_parameters() -> None:
    async def main() -> None:
        async with cluster(2) as (core, (a, b), flow, _):
            await core.add_request_async(request("r4", [8, 9], 4, temperature=1.0, seed=11))
            await a.next_request()
            await a.lose(["r4"])
            again = await b.next_request()
            assert again.prompt_token_ids == [8, 9] and again.sampling_params.max_tokens == 4
            assert again.sampling_params.seed == 11
            await b.step("r4.m1", [1, 2, 3, 4], finished=True)
            tokens, _ = await outputs_until_finished(core, "r4")
            assert tokens == [1, 2, 3, 4] and migrations(flow) == 1

    asyncio.run(main())


def test_a_silent_worker_counts_as_failed_after_the_stall_timeout() -> None:
    async def main() -> None:
        async with cluster(2, stall_timeout_s=3.0) as (core, (a, b), flow, _):
            await core.add_request_async(request("r5", [4], 3, temperature=0.0))
            await a.next_request()
            await a.step("r5", [40])
            await asyncio.wait_for(core.get_output_async(), 10)
            moved = await asyncio.wait_for(b.next_request(), 10)  # a says nothing more
            assert moved.prompt_token_ids == [4, 40]

    asyncio.run(main())


def test_no_worker_left_ends_the_request_with_an_error() -> None:
    async def main() -> None:
        async with cluster(1) as (core, (a,), flow, _):
            await core.add_request_async(request("r6", [3], 3, temperature=0.0))
            await a.next_request()
            await a.step("r6", [50])
            await asyncio.wait_for(core.get_output_async(), 10)
            a.die()
            tokens, reason = await outputs_until_finished(core, "r6")
            assert tokens == [] and reason.name == "ERROR"

    asyncio.run(main())


def test_a_client_set_kv_transfer_parameter_never_reaches_a_worker() -> None:
    """`extra_args` with kv_transfer_params (a client's `vllm_xargs` past the HTTP check)
    ends the request with an error; the worker never sees it, and the next request is served."""
    async def main() -> None:
        async with cluster(1) as (core, (a,), _, directory):
            await core.add_request_async(request(
                "r9", [1, 2], 3, extra_args={"kv_transfer_params": {"do_remote_prefill": True}}))
            tokens, reason = await outputs_until_finished(core, "r9")
            assert tokens == [] and reason.name == "ERROR"
            assert a.requests.empty() and directory.in_flight == {}
            await core.add_request_async(request("r10", [1, 2], 1, temperature=0.0))
            assert (await a.next_request()).request_id == "r10"

    asyncio.run(main())


def ledger_view(flow: OneAtATime, worker: ScriptedWorker) -> Any:
    return flow.ledger.view({worker.info.worker_id: 0.0})[worker.info.worker_id]


def test_the_dispatch_ledger_follows_a_request_from_dispatch_to_its_end() -> None:
    """What the kv policy knows between heartbeats: a request is pending on its worker (with
    its prompt to compute) until its first token, then decoding, then gone."""
    async def main() -> None:
        async with cluster(1) as (core, (a,), flow, _):
            await core.add_request_async(request("r11", list(range(40)), 3, temperature=0.0))
            await a.next_request()
            pending = ledger_view(flow, a)
            assert (pending.pending_reqs, pending.pending_uncached_tokens,
                    pending.decoding_reqs) == (1, 40, 0)
            await a.step("r11", [1])
            await asyncio.wait_for(core.get_output_async(), 10)
            decoding = ledger_view(flow, a)
            assert (decoding.pending_reqs, decoding.decoding_reqs) == (0, 1)
            await a.step("r11", [2, 3], finished=True)
            await outputs_until_finished(core, "r11")
            ended = ledger_view(flow, a)
            assert (ended.pending_reqs, ended.decoding_reqs) == (0, 0)

    asyncio.run(main())


def test_a_prefill_hands_its_kv_to_the_decode_worker_and_a_failed_one_computes_locally(
        ) -> None:
    """P gets a copy of the request (max_tokens 1, do_remote_decode); D gets the request with
    the kv_transfer_params P returned. When P fails, D gets the request without them (it
    computes the prompt itself) and the fallback is counted."""
    async def main() -> None:
        async with cluster(1) as (core, (d,), flow, _):
            p = ScriptedWorker("prefill-0")
            flow.prefill = p
            try:
                await core.add_request_async(request("r12", [1, 2, 3], 2, temperature=0.0))
                pre = await p.next_request()
                assert pre.request_id == "r12-prefill"
                assert pre.sampling_params.max_tokens == 1
                assert pre.sampling_params.extra_args["kv_transfer_params"] == {
                    "do_remote_decode": True}
                assert ledger_view(flow, p).pending_reqs == 1
                held = {"remote_engine_id": "prefill-0", "remote_block_ids": [7]}
                await p.step("r12-prefill", [9], finished=True, kv_transfer_params=held)
                dec = await d.next_request()
                assert dec.request_id == "r12"
                assert dec.sampling_params.extra_args["kv_transfer_params"] == held
                assert ledger_view(flow, p).pending_reqs == 0  # P's part is done
                await d.step("r12", [4, 5], finished=True)
                tokens, _ = await outputs_until_finished(core, "r12")
                assert tokens == [4, 5]

                await core.add_request_async(request("r13", [1, 2], 2, temperature=0.0))
                assert (await p.next_request()).request_id == "r13-prefill"
                await p.lose(["r13-prefill"])
                dec = await d.next_request()
                assert dec.request_id == "r13"
                assert "kv_transfer_params" not in (dec.sampling_params.extra_args or {})
                assert flow.metrics.prefill_fallbacks._value.get() == 1
            finally:
                p.stop()

    asyncio.run(main())


def test_a_request_gives_up_after_max_migrations() -> None:
    async def main() -> None:
        async with cluster(3, max_migrations=1) as (core, (a, b, c), flow, directory):
            await core.add_request_async(request("r14", [3], 4, temperature=0.0))
            await a.next_request()
            await a.lose(["r14"])
            await b.next_request()
            await b.lose(["r14.m1"])
            tokens, reason = await outputs_until_finished(core, "r14")
            assert tokens == [] and reason.name == "ERROR"
            assert c.requests.empty() and migrations(flow) == 1 and directory.in_flight == {}

    asyncio.run(main())


def test_a_request_past_its_timeout_ends_and_is_aborted_on_its_worker() -> None:
    """request_timeout_s bounds a request's duration: past it the request ends with an error,
    its worker is told to abort it, and it leaves the in-flight counts."""
    async def main() -> None:
        async with cluster(1, request_timeout_s=1.0) as (core, (a,), _, directory):
            aborts: list[Any] = []
            reader = a._reader
            reader.cancel()

            async def read() -> None:  # the scripted worker, also recording aborts
                while True:
                    frames = await a.sock.recv_multipart(copy=False)
                    a.gateway = frames[0].bytes
                    if frames[1].bytes == ADD:
                        await a.requests.put(a._decoder.decode(frames[2:]))
                    else:
                        aborts.append(msgspec.msgpack.decode(frames[2].bytes))

            a._reader = asyncio.create_task(read())
            await core.add_request_async(request("r15", [3], 100, temperature=0.0))
            await a.next_request()
            await a.step("r15", [1])
            tokens, reason = await outputs_until_finished(core, "r15")
            assert tokens == [1] and reason.name == "ERROR"
            for _ in range(50):
                if aborts:
                    break
                await asyncio.sleep(0.1)
            assert aborts == [["r15"]] and directory.in_flight == {}

    asyncio.run(main())
