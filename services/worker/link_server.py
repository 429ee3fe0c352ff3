"""The worker's end of the engine link (services/link.py): engine-core requests from gateways go
straight to this worker's engine core; its outputs for them go back, one message per engine
step per gateway, without passing through the worker's own output processor (no
detokenization here: the gateway's front end does it, once).

Only gateways holding the cluster secret get through (CURVE, services/link.py). The KV transfer
parameters a prefill hands out are signed here, and those a decode request brings are verified
here before the engine sees them (services/worker/kv_params_signing.py); refused ones are
dropped, and the engine computes the prompt itself.

The worker's `AsyncLLM` owns the engine core and vLLM's statistics loggers; the link shares
its engine core. Its output handler is restarted over a `get_output_async` that takes the
link's requests' outputs out of each step first (`divert`); the step's scheduler statistics go
on to the `AsyncLLM`'s loggers as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import msgspec
import zmq
import zmq.asyncio

from services.link import (ABORT, ADD, FAILED, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, LOST,
                           OUTPUTS, LinkAuthenticator, LinkKeys)
from services.worker.kv_params_signing import KVParamsSigner, Reason, admit
from services.worker.link_stats import LinkRequestStats

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.stats import IterationStats

    from services.worker.engine import EngineCounters
    from services.worker.engine_speed import EngineSpeed

log = logging.getLogger(__name__)


class LinkServer:
    """Serves the engine link of one worker on a TCP port."""

    def __init__(self, engine: "AsyncLLM", host: str, port: int, keys: LinkKeys,
                 signer: KVParamsSigner,
                 on_refused: Callable[[Reason], None] = lambda reason: None,
                 counters: "EngineCounters | None" = None,
                 on_step_stats: "Callable[[IterationStats, int], None] | None" = None,
                 speed: "EngineSpeed | None" = None) -> None:
        from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        self._engine = engine
        self._core = engine.engine_core
        self._host, self._port = host, port
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder(EngineCoreRequest)
        self._outputs_type = EngineCoreOutputs
        self._owner: dict[str, bytes] = {}  # request id -> the gateway that sent it
        self._busy_since: float | None = None  # wall clock: _owner last became non-empty
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._keys, self._signer, self._on_refused = keys, signer, on_refused
        self._auth: LinkAuthenticator | None = None
        self._counters, self._on_step_stats = counters, on_step_stats
        self._stats = LinkRequestStats() if on_step_stats is not None else None
        self._speed = speed  # the router's figures: prompt work waiting, batch (engine_speed.py)

    @property
    def refused_clients(self) -> int:
        """Connections refused for not holding the cluster's link key."""
        return self._auth.refused if self._auth is not None else 0

    @property
    def in_flight(self) -> int:
        """Link requests the engine is working on."""
        return len(self._owner)

    @property
    def busy_since(self) -> float | None:
        """When (wall clock) the engine last got a request while it had none; None while it
        has none (an engine idle for minutes that just got a request is not stalled)."""
        if not self._owner:
            self._busy_since = None
        return self._busy_since

    async def start(self) -> int:
        """Bind, take over the engine's output stream, start reading; returns the port."""
        self._ctx = zmq.asyncio.Context()
        self._auth = LinkAuthenticator(self._ctx, self._keys)
        self._auth.start()  # before the bind: no connection is ever let in unchecked
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._keys.secure_server(self._sock)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting gateway keeps its id
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self._port:
            self._sock.bind(f"tcp://{self._host}:{self._port}")
            port = self._port
        else:
            port = self._sock.bind_to_random_port(f"tcp://{self._host}")
        divert(self._engine, self._forward, self._engine_failed)
        self._reader = asyncio.create_task(self._read(), name="link-reader")
        return port

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._owner:
            ids = list(self._owner)
            for request_id in ids:
                self._untrack(request_id)
            try:
                await self._core.abort_requests_async(ids)
            except Exception:
                log.warning("could not abort %d link requests", len(ids), exc_info=True)
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.term()

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            gateway, kind, body = frames[0].bytes, frames[1].bytes, frames[2:]
            try:
                if kind == ADD:
                    await self._add(gateway, body)
                elif kind == ABORT:
                    ids = msgspec.msgpack.decode(body[0].bytes)
                    for request_id in ids:
                        if self._untrack(request_id) is not None:
                            self._count_abort(request_id)
                    await self._core.abort_requests_async(ids)
                else:
                    log.warning("engine link: unknown frame type %r from a gateway", kind)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("engine link: a message from a gateway failed")

    async def _add(self, gateway: bytes, body: list[Any]) -> None:
        request = self._decoder.decode(body)
        self._admit_kv_params(request)
        if request.request_id in self._owner:
            await self._fail(gateway, request.request_id, "request id already in flight")
            return
        if not request.abort_immediately:
            self._track(request, gateway)
        try:
            await self._core.add_request_async(request)
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            self._untrack(request.request_id)
            message = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, EngineDeadError):  # the worker failed, not the request: the
                assert self._sock is not None      # gateway moves it to another worker
                await self._sock.send_multipart(
                    [gateway, LOST, msgspec.msgpack.encode([[request.request_id], message])])
            else:
                await self._fail(gateway, request.request_id, message)
            return
        if not request.abort_immediately:
            if self._counters is not None:
                self._counters.requests_total += 1
            if self._stats is not None:
                self._stats.add(request)
            _log_request(request)

    def _track(self, request: Any, gateway: bytes) -> None:
        """The engine works on a link request from `gateway`: in flight (busy_since), and
        in the engine's speed figures (prompt work waiting, batch) until `_untrack`."""
        if not self._owner or self._busy_since is None:
            self._busy_since = time.time()
        self._owner[request.request_id] = gateway
        if self._speed is not None:
            kv = (getattr(request.sampling_params, "extra_args", None) or {}).get(
                "kv_transfer_params") or {}
            self._speed.started(request.request_id, len(request.prompt_token_ids or ()),
                                remote=bool(kv.get("do_remote_prefill")))

    def _untrack(self, request_id: str) -> bytes | None:
        """The request left the engine (finished, aborted, failed): no longer in flight;
        returns the gateway that sent it (None: not a link request in flight)."""
        gateway = self._owner.pop(request_id, None)
        if gateway is not None and self._speed is not None:
            self._speed.ended(request_id)
        return gateway

    def _count_abort(self, request_id: str) -> None:
        if self._counters is not None:
            self._counters.requests_aborted += 1
        if self._stats is not None:
            self._stats.forget(request_id)

    def _admit_kv_params(self, request: Any) -> None:
        """Verify the KV transfer parameters a request brings; drop refused ones (the engine
        then computes the prompt itself)."""
        params = request.sampling_params
        extra = getattr(params, "extra_args", None) or {}
        kv = extra.get("kv_transfer_params")
        if not kv:
            return
        admitted = admit(self._signer, request.request_id, kv, self._on_refused,
                         release=bool(request.abort_immediately), log=log)
        rest = {k: v for k, v in extra.items() if k != "kv_transfer_params"}
        if admitted is not None:
            rest["kv_transfer_params"] = admitted
        params.extra_args = rest or None

    async def _fail(self, gateway: bytes, request_id: str, message: str) -> None:
        assert self._sock is not None
        await self._sock.send_multipart(
            [gateway, FAILED, msgspec.msgpack.encode([request_id, message])])

    async def _engine_failed(self, exc: BaseException) -> None:
        """The engine core died: every gateway learns at once which of its requests are lost
        (they continue on other workers) instead of waiting for outputs that never come."""
        if not self._owner or self._sock is None:
            return
        by_gateway: dict[bytes, list[str]] = {}
        for request_id in list(self._owner):
            gateway = self._untrack(request_id)
            assert gateway is not None
            by_gateway.setdefault(gateway, []).append(request_id)
            if self._stats is not None:
                self._stats.forget(request_id)
        message = f"the worker's engine failed: {type(exc).__name__}: {exc}"
        log.error("engine failed under %d link requests: %s", sum(map(len, by_gateway.values())),
                  message)
        for gateway, ids in by_gateway.items():
            await self._sock.send_multipart(
                [gateway, LOST, msgspec.msgpack.encode([ids, message])])

    async def _forward(self, outputs: Any) -> None:
        """Send the link's requests' outputs of one engine step to their gateways, and leave
        the others in `outputs` for the worker's own output processor."""
        if not self._owner or not outputs.outputs:
            return
        by_gateway: dict[bytes, list[Any]] = {}
        rest = []
        for out in outputs.outputs:
            gateway = self._owner.get(out.request_id)
            if gateway is None:
                rest.append(out)
                continue
            by_gateway.setdefault(gateway, []).append(out)
            if out.kv_transfer_params:  # a prefill's: where its KV is held, signed
                out.kv_transfer_params = self._signer.sign(out.request_id,
                                                           dict(out.kv_transfer_params))
            if self._speed is not None:
                self._speed.first_output(out.request_id)  # a no-op after the first
            if out.finish_reason is not None:
                self._untrack(out.request_id)
        if not by_gateway:
            return
        outputs.outputs = rest
        if self._stats is not None and self._on_step_stats is not None:
            diverted = [out for outs in by_gateway.values() for out in outs]
            self._on_step_stats(self._stats.step(diverted, outputs.timestamp),
                                outputs.engine_index)
        assert self._sock is not None
        for gateway, outs in by_gateway.items():
            step = self._outputs_type(outputs=outs, timestamp=outputs.timestamp)
            await self._sock.send_multipart([gateway, OUTPUTS, *self._encoder.encode(step)],
                                            copy=False)


def _log_request(request: Any) -> None:
    """One line per request the engine takes, with its id (which carries the client's)."""
    extra = getattr(request.sampling_params, "extra_args", None) or {}
    kv = extra.get("kv_transfer_params") or {}
    n, rid = len(request.prompt_token_ids or ()), request.request_id
    if kv.get("do_remote_decode"):
        log.info("prefill %s: %d prompt tokens; KV held for decode", rid, n,
                 extra={"engine_request_id": rid})
    else:
        log.info("generate %s: %d prompt tokens, KV %s", rid, n,
                 "from a prefill worker" if kv.get("do_remote_prefill") else "computed here",
                 extra={"engine_request_id": rid})


def divert(engine: "AsyncLLM", forward: Any, failed: Any = None) -> None:
    """Let `forward(outputs)` see (and take out) every engine step's outputs before the
    engine's own output processor does, and `failed(exc)` learn that the engine core died:
    its output handler is restarted over a wrapped `get_output_async` (vLLM internals:
    `AsyncLLM.output_handler`, `_run_output_handler`, `engine_core.get_output_async`;
    tests/unit/test_vllm_seam.py fails when they change)."""
    core = engine.engine_core
    original = core.get_output_async

    async def get_output_async() -> Any:
        try:
            outputs = await original()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # EngineDeadError: the engine-core process is gone
            if failed is not None:
                await failed(exc)
            raise
        await forward(outputs)
        return outputs

    handler = engine.output_handler
    if handler is not None:
        handler.cancel()  # it waits in original(); cancelling a queue get loses nothing
        engine.output_handler = None
    core.get_output_async = get_output_async
    engine._run_output_handler()
