"""The gateway's real front end (vLLM's OpenAI app and the gRPC API, the gateway's guard and
middleware, a real Redis registry) in this process over a scripted engine core instead of the
cluster: for tests of what the front end does with requests, without engines.

The scripted core answers every request with one token per step (token ids 10, 11, ...) up to
its max_tokens; a request with `ignore_eos` pauses after its third token until `release` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx

from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.gateway.config import GatewayConfig
from services.gateway.gateway import Gateway
from services.gateway.vllm_frontend import (FrontendGuard, build_frontend_app, remote_async_llm,
                                            server_args)


class ScriptedEngineCore:
    """What vLLM's AsyncLLM asks of its engine-core client (as services/gateway/
    remote_core.py serves it), answered by a script."""

    def __init__(self) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

        self._output, self._outputs, self._length = (EngineCoreOutput, EngineCoreOutputs,
                                                     FinishReason.LENGTH)
        self.engine_ranks_managed = [0]
        self.resources = SimpleNamespace(engine_dead=False)
        self.release = asyncio.Event()
        self.requests: list[Any] = []  # every request taken, in order
        self.aborted: list[str] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task] = {}

    async def add_request_async(self, request: Any) -> None:
        self.requests.append(request)
        rid = request.request_id
        self._tasks[rid] = asyncio.create_task(self._generate(request))

    async def _generate(self, request: Any) -> None:
        sp = request.sampling_params
        n = sp.max_tokens or 1
        for i in range(n):
            if i == 3 and sp.ignore_eos:
                await self.release.wait()
            await asyncio.sleep(0.001)
            last = i == n - 1
            out = self._output(request_id=request.request_id, new_token_ids=[10 + i],
                               finish_reason=self._length if last else None)
            self._queue.put_nowait(self._outputs(outputs=[out], timestamp=time.monotonic()))
        self._tasks.pop(request.request_id, None)

    async def get_output_async(self) -> Any:
        return await self._queue.get()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if (task := self._tasks.pop(rid, None)) is not None:
                task.cancel()
                self.aborted.append(rid)

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    def dp_engines_running(self) -> bool:
        return bool(self._tasks)

    def get_kv_event_sources(self) -> dict:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        for task in self._tasks.values():
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)


@dataclass
class Frontend:
    """A started front end: its gateway state, its ASGI app, its scripted core."""

    gateway: Gateway
    app: Any
    core: ScriptedEngineCore
    grpc_servers: list[Any] = field(default_factory=list)

    def http(self, key: str | None = None, client: tuple[str, int] = ("127.0.0.1", 40000)
             ) -> httpx.AsyncClient:
        """An HTTP client of the app (in process: no socket)."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, client=client),
                                 base_url="http://gw", headers=headers, timeout=30)

    async def grpc(self, port: int) -> str:
        """Serve the gRPC API on 127.0.0.1:port (stopped with the front end); its target."""
        from services.gateway.grpc_api import start_grpc_server

        self.grpc_servers.append(await start_grpc_server(self.gateway, self.app.state,
                                                         "127.0.0.1", port))
        return f"127.0.0.1:{port}"


SERVING = WorkerInfo(worker_id="w-both", role=WorkerRole.BOTH, address="127.0.0.1:1",
                     link_address="127.0.0.1:2", model="m")
"""The registry's one worker (nothing listens there: the scripted core stands for it)."""


@contextlib.asynccontextmanager
async def frontend(model_dir: str, redis_url: str, workers: bool = True, **cfg: Any
                   ) -> AsyncIterator[Frontend]:
    """The gateway's front end for the model in `model_dir` (served as "m"), its registry in
    the Redis at `redis_url` holding one serving worker (none: `workers` False). Needs the
    cluster secret in the environment, as a gateway does."""
    from redis.asyncio import Redis

    config = GatewayConfig(model=model_dir, served_model_name="m", redis_url=redis_url,
                           namespace="frontend-test", **cfg)
    client = Redis.from_url(redis_url)
    if workers:
        await WorkerRegistry(client, config.namespace, ttl_s=120).register(SERVING)
    gateway = Gateway(config)
    await gateway.start()
    FrontendGuard.gateway = gateway
    core = ScriptedEngineCore()
    engine = remote_async_llm(server_args(config), core,  # type: ignore[arg-type]
                              gateway.metrics)
    front = Frontend(gateway, await build_frontend_app(engine, server_args(config)), core)
    try:
        yield front
    finally:
        for server in front.grpc_servers:
            await server.stop(0)
        engine.shutdown()
        await gateway.stop()
        await WorkerRegistry(client, config.namespace).deregister(SERVING.worker_id)
        await client.aclose()
        FrontendGuard.gateway = None
