"""Engine-core requests straight to a cluster's workers over their engine links, as the
gateway's remote core sends them (services/gateway/link_client.py, the cluster's link keys):
for tests that drive one worker by hand (a prefill alone, a decode with given KV transfer
parameters, a raw prompt)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import zmq.asyncio

from services.cluster_secret import ClusterSecret
from services.gateway.link_client import LinkClient
from services.link import LinkKeys


class LinkFailed(RuntimeError):
    """A worker refused a request, or lost it."""


def engine_request(request_id: str, prompt: list[int], max_tokens: int,
                   kv_transfer_params: dict[str, Any] | None = None,
                   abort_immediately: bool = False, **sampling: Any) -> Any:
    """vLLM's engine-core request for a token prompt (greedy unless `sampling` says)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    sampling.setdefault("temperature", 0.0)
    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra,
                            output_kind=RequestOutputKind.DELTA, **sampling)
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=prompt, mm_features=None,
        sampling_params=params, pooling_params=None, arrival_time=time.time(),
        lora_request=None, cache_salt=None, data_parallel_rank=None,
        abort_immediately=abort_immediately)


class EngineLinks:
    """Links to workers (registry entries, as `splitserve status --json` lists them), with the
    cluster's keys; `run` sends one request and gathers its outputs until it finishes."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._keys = LinkKeys.derive(secret)
        self._ctx = zmq.asyncio.Context()
        self._links: dict[str, LinkClient] = {}
        self._waiting: dict[str, tuple[asyncio.Future, list[Any]]] = {}
        self._worker_of: dict[str, str] = {}  # request id -> the worker it was sent to

    async def __aenter__(self) -> "EngineLinks":
        return self

    async def __aexit__(self, *exc: object) -> None:
        for link in self._links.values():
            link.close()
        self._ctx.destroy(linger=0)

    def _link(self, worker: dict[str, Any]) -> LinkClient:
        wid = worker["worker_id"]
        if wid not in self._links:
            self._links[wid] = LinkClient(self._ctx, wid, worker["link_address"],
                                          self._on_outputs, self._on_failed, self._on_lost,
                                          self._keys)
        return self._links[wid]

    def _on_outputs(self, worker_id: str, outputs: Any) -> None:
        for out in outputs.outputs:
            if (entry := self._waiting.get(out.request_id)) is None:
                continue
            done, seen = entry
            seen.append(out)
            if out.finish_reason is not None and not done.done():
                done.set_result(seen)

    def _on_failed(self, worker_id: str, request_id: str, message: str) -> None:
        if (entry := self._waiting.get(request_id)) is not None and not entry[0].done():
            entry[0].set_exception(LinkFailed(f"{worker_id} refused {request_id}: {message}"))

    def _on_lost(self, worker_id: str, request_ids: list[str] | None, reason: str) -> None:
        if request_ids is None:  # the link to `worker_id` dropped: its requests, no others
            request_ids = [r for r, w in self._worker_of.items() if w == worker_id]
        for rid in request_ids:
            if (entry := self._waiting.get(rid)) is not None and not entry[0].done():
                entry[0].set_exception(LinkFailed(f"{worker_id} lost {rid}: {reason}"))

    async def run(self, worker: dict[str, Any], request: Any, timeout_s: float = 120
                  ) -> list[Any]:
        """The request's outputs on `worker`, until its last."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = (done, [])
        self._worker_of[request.request_id] = worker["worker_id"]
        try:
            await self._link(worker).add(request)
            return await asyncio.wait_for(done, timeout_s)
        finally:
            self._waiting.pop(request.request_id, None)
            self._worker_of.pop(request.request_id, None)

    async def send(self, worker: dict[str, Any], request: Any) -> None:
        """Send without waiting for outputs (a request that ends at once, e.g. a release)."""
        await self._link(worker).add(request)

    async def prefill(self, worker: dict[str, Any], request_id: str, prompt: list[int]
                      ) -> tuple[dict[str, Any], int]:
        """The prompt prefilled on a prefill worker, its KV held for a decode: the signed KV
        transfer parameters and the prompt tokens that were prefix-cache hits there."""
        outs = await self.run(worker, engine_request(
            request_id, prompt, 1, kv_transfer_params={"do_remote_decode": True}))
        last = outs[-1]
        assert last.kv_transfer_params, f"the prefill of {request_id} returned no KV params"
        stats = next((o.prefill_stats for o in outs if o.prefill_stats is not None), None)
        return dict(last.kv_transfer_params), int(stats.num_cached_tokens if stats else 0)

    async def release(self, decode: dict[str, Any], request_id: str,
                      kv_transfer_params: dict[str, Any]) -> None:
        """Free the KV a prefill worker holds for a decode that will not run (through the
        decode worker's connector, as the gateway does). Then one token on the decode worker:
        the link delivers in order, so the release has reached its engine when that token
        comes back, and the engine's step has sent the connector's notification to the
        prefill worker (an idle engine sends none)."""
        await self.send(decode, engine_request(f"{request_id}-release", [0], 1,
                                               kv_transfer_params=kv_transfer_params,
                                               abort_immediately=True))
        await self.generate(decode, f"{request_id}-released", [0], 1)

    async def generate(self, worker: dict[str, Any], request_id: str, prompt: list[int],
                       max_tokens: int, kv_transfer_params: dict[str, Any] | None = None,
                       **sampling: Any) -> list[int]:
        """The token ids a worker generates for the prompt."""
        outs = await self.run(worker, engine_request(request_id, prompt, max_tokens,
                                                     kv_transfer_params, **sampling))
        return [t for o in outs for t in o.new_token_ids]
