"""The engine link between a gateway and a worker: vLLM's own engine-core messages on ZeroMQ.

The gateway's front end (vLLM's serving layer, tokenizer, detokenizer, stop strings) makes
vLLM's `EngineCoreRequest`s and consumes `EngineCoreOutputs`, exactly as vLLM's API server does
with its engine-core process; the link carries them between machines with vLLM's msgpack codec
(`vllm/v1/serial_utils.py`). A worker binds one ROUTER socket; each gateway connects one DEALER
socket per worker, so every gateway's requests to a worker share one connection, and a worker
sends one message per engine step per gateway with the outputs of all that gateway's requests.

Frames (multipart), gateway -> worker: `ADD` + the encoded `EngineCoreRequest`, or `ABORT` +
a msgpack list of request ids. Worker -> gateway: `OUTPUTS` + the encoded `EngineCoreOutputs`,
or `FAILED` + msgpack `[request_id, message]` when a request could not be added.
"""

from __future__ import annotations

ADD = b"A"
ABORT = b"X"
OUTPUTS = b"O"
FAILED = b"F"


class LinkError(RuntimeError):
    """The link to a worker broke, or the worker refused a request."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"worker {worker_id}: {reason}")
        self.worker_id = worker_id
