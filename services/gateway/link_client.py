"""The gateway's end of the engine link (services/link.py) to one worker: one DEALER socket,
shared by every request this gateway sends that worker, a CURVE client with the cluster's
link keys (services/link.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

import msgspec
import zmq
import zmq.asyncio

from services.link import ABORT, ADD, FAILED, OUTPUTS, LinkKeys

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest

log = logging.getLogger(__name__)

OnOutputs = Callable[[str, "EngineCoreOutputs"], None]
OnFailed = Callable[[str, str, str], None]


class LinkClient:
    """Sends engine-core requests to one worker and hands its outputs to callbacks:
    `on_outputs(worker_id, outputs)`, `on_failed(worker_id, request_id, message)`."""

    def __init__(self, ctx: zmq.asyncio.Context, worker_id: str, address: str,
                 on_outputs: OnOutputs, on_failed: OnFailed, keys: LinkKeys) -> None:
        from vllm.v1.engine import EngineCoreOutputs
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        self.worker_id = worker_id
        self.address = address
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder(EngineCoreOutputs)
        self._on_outputs, self._on_failed = on_outputs, on_failed
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        keys.secure_client(self._sock)
        self._sock.connect(f"tcp://{address}")
        self._reader = asyncio.create_task(self._read(), name=f"link-{worker_id}")

    async def add(self, request: "EngineCoreRequest") -> None:
        await self._sock.send_multipart([ADD, *self._encoder.encode(request)], copy=False)

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            await self._sock.send_multipart([ABORT, msgspec.msgpack.encode(request_ids)])

    def close(self) -> None:
        self._reader.cancel()
        self._sock.close(linger=0)

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
                else:
                    log.warning("engine link: unknown frame type %r from %s", kind,
                                self.worker_id)
            except Exception:
                log.exception("engine link: a message from %s failed", self.worker_id)

