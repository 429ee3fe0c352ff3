"""A stand-in for the gateway's PD flow (no workers) for unit tests of the gateway's front
ends: it streams `max_tokens` chunks "t0", "t1", ...; with `ignore_eos` it pauses after the
third until `pause` is set; it can fail with a given exception; it counts streams closed before
their end (what a cancelled request leaves)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.proto.v1 import worker_pb2 as wpb


class FakeFlow:
    def __init__(self) -> None:
        self.closed_early = 0
        self.fail: Exception | None = None
        self.pause = asyncio.Event()

    async def stream(self, request_id: str, token_ids: list[int], sampling: Any, result: Any):
        result.num_prompt_tokens = len(token_ids)
        finished = False
        try:
            if self.fail is not None:
                raise self.fail
            for i in range(int(sampling.max_tokens)):
                result.completion_tokens += 1
                if i == 2 and sampling.ignore_eos:  # "long" generation: wait
                    await self.pause.wait()
                last = i == int(sampling.max_tokens) - 1
                if last:
                    result.finish_reason = "length"
                yield wpb.GenerateChunk(token_ids=[i], text=f"t{i}",
                                        finish_reason="length" if last else "")
            finished = True
        finally:
            if not finished:
                self.closed_early += 1
