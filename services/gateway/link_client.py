"""The gateway's end of the engine link (services/link.py) to one worker: one DEALER socket,
shared by every request this gateway sends that worker, a CURVE client with the cluster's
link keys (services/link.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from services.link import (ABORT, ADD, FAILED, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, LOST,
                           OUTPUTS, LinkKeys)

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest

log = logging.getLogger(__name__)

OnOutputs = Callable[[str, "EngineCoreOutputs"], None]
OnFailed = Callable[[str, str, str], None]
OnLost = Callable[[str, "list[str] | None", str], None]


class LinkClient:
    """Sends engine-core requests to one worker and hands its outputs to callbacks:
    `on_outputs(worker_id, outputs)`, `on_failed(worker_id, request_id, message)` (a request
    the worker refused), `on_lost(worker_id, request_ids, reason)` (requests the worker will
    not finish: its engine died under `request_ids`, or, with None, the connection dropped
    and every request sent on it is lost)."""

    def __init__(self, ctx: zmq.asyncio.Context, worker_id: str, address: str,
                 on_outputs: OnOutputs, on_failed: OnFailed, on_lost: OnLost,
                 keys: LinkKeys) -> None:
        from vllm.v1.engine import EngineCoreOutputs
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        self.worker_id = worker_id
        self.address = address
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder(EngineCoreOutputs)
        self._on_outputs, self._on_failed, self._on_lost = on_outputs, on_failed, on_lost
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        keys.secure_client(self._sock)
        self._sock.connect(f"tcp://{address}")
        self._reader = asyncio.create_task(self._read(), name=f"link-{worker_id}")
        self._watcher = asyncio.create_task(self._watch(), name=f"link-watch-{worker_id}")

    async def add(self, request: "EngineCoreRequest") -> None:
        await self._sock.send_multipart([ADD, *self._encoder.encode(request)], copy=False)

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            await self._sock.send_multipart([ABORT, msgspec.msgpack.encode(request_ids)])

    def close(self) -> None:
        """Idempotent: vLLM's server shuts its engine client down, then the gateway does."""
        if self._sock.closed:
            return
        self._reader.cancel()
        self._watcher.cancel()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    async def _watch(self) -> None:
        """A dropped connection (the worker's process died, or stopped answering heartbeats)
        loses every request sent on it; ZeroMQ reconnects by itself for the next ones."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("engine link to %s (%s) dropped", self.worker_id, self.address)
                try:
                    self._on_lost(self.worker_id, None, "its engine link dropped")
                except Exception:
                    log.exception("engine link: handling the drop of %s failed", self.worker_id)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            kind, body = frames[0].bytes, frames[1:]
            try:
                if kind == OUTPUTS:
                    self._on_outputs(self.worker_id, self._decoder.decode(body))
                elif kind == FAILED:
                    request_id, message = msgspec.msgpack.decode(body[0].bytes)
                    self._on_failed(self.worker_id, request_id, message)
                elif kind == LOST:
                    request_ids, message = msgspec.msgpack.decode(body[0].bytes)
                    self._on_lost(self.worker_id, list(request_ids), message)
                else:
                    log.warning("engine link: unknown frame type %r from %s", kind,
                                self.worker_id)
            except Exception:
                log.exception("engine link: a message from %s failed", self.worker_id)

