"""The engine link between a gateway and a worker: vLLM's own engine-core messages on ZeroMQ.

The gateway's front end (vLLM's serving layer, tokenizer, detokenizer, stop strings) makes
vLLM's `EngineCoreRequest`s and consumes `EngineCoreOutputs`, exactly as vLLM's API server does
with its engine-core process; the link carries them between machines with vLLM's msgpack codec
(`vllm/v1/serial_utils.py`). A worker binds one ROUTER socket; each gateway connects one DEALER
socket per worker, so every gateway's requests to a worker share one connection, and a worker
sends one message per engine step per gateway with the outputs of all that gateway's requests.

Frames (multipart), gateway -> worker: `ADD` + the encoded `EngineCoreRequest`, or `ABORT` +
a msgpack list of request ids. Worker -> gateway: `OUTPUTS` + the encoded `EngineCoreOutputs`,
`FAILED` + msgpack `[request_id, message]` when a request could not be added (the request's
fault: it is not retried), or `LOST` + msgpack `[request_ids, message]` when the worker's
engine died under those requests (the gateway continues them on another worker).

A worker that dies outright sends nothing: the gateway's socket sees the connection drop
(ZeroMQ's socket monitor), or the link's heartbeats time out (`HEARTBEAT_IVL_MS`,
`HEARTBEAT_TIMEOUT_MS`) for a host or process that stops answering.
"""

from __future__ import annotations

ADD = b"A"
ABORT = b"X"
OUTPUTS = b"O"
FAILED = b"F"
LOST = b"L"

HEARTBEAT_IVL_MS = 2000
"""ZMTP heartbeats on the link (answered by ZeroMQ's I/O thread, not by Python: a busy
engine step does not miss them)"""
HEARTBEAT_TIMEOUT_MS = 10000
"""a peer silent this long is disconnected (its requests move to another worker)"""

