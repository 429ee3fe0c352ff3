"""The worker's gRPC API (proto/splitserve/v1/worker.proto) over its EngineHost."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc

from services import request_id as request_ids
from services.proto.v1 import worker_pb2 as pb
from services.proto.v1 import worker_pb2_grpc as pb_grpc
from services.worker.engine import EngineHost, Sampling, dumps_params, loads_params
from services.worker.kv_params_signing import KVParamsSigner, Reason, admit

log = logging.getLogger(__name__)


def sampling_from_pb(msg: pb.SamplingParams) -> Sampling:
    """Wire sampling parameters to the engine host's."""
    return Sampling(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        include_stop_str_in_output=msg.include_stop_str_in_output,
    )


class WorkerService(pb_grpc.WorkerServicer):
    """Serves one worker's engine."""

    def __init__(self, host: EngineHost, signer: KVParamsSigner) -> None:
        self.host = host
        self.signer = signer  # signs what Prefill hands out, verifies what decode is given

    def kv_params_refused(self, reason: Reason) -> None:
        """Count KV transfer parameters this worker refused (forged, expired, replayed)."""
        if (metrics := getattr(self.host, "metrics", None)) is not None:
            metrics.kv_params_refused.labels(reason).inc()

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PrefillResponse:
        try:
            params, cached = await self.host.prefill(
                request.request_id, list(request.prompt_token_ids), sampling_from_pb(request.sampling))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # engine dead or failing: the caller goes elsewhere
            log.warning("prefill %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        log.info("prefill %s: %d prompt tokens, %d cached; KV held for decode",
                 request.request_id, len(request.prompt_token_ids), cached,
                 extra={"engine_request_id": request.request_id})
        params = self.signer.sign(request.request_id, params)
        return pb.PrefillResponse(kv_transfer_params_json=dumps_params(params),
                                  num_cached_tokens=cached)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self.chunks(request):
                yield chunk
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # engine dead or failing: the gateway migrates the request
            log.warning("generate %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}")

    async def chunks(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        """One request's chunks, from the engine (Generate and GenerateStream alike)."""
        try:
            kv_params = loads_params(request.kv_transfer_params_json)
        except ValueError:
            raise ValueError("kv_transfer_params_json is not JSON") from None
        if kv_params is not None and not isinstance(kv_params, dict):
            raise ValueError("kv_transfer_params_json is not a JSON object")
        kv_params = admit(self.signer, request.request_id, kv_params, self.kv_params_refused,
                          log=log)
        log.info("generate %s: %d prompt tokens, KV %s", request.request_id,
                 len(request.prompt_token_ids),
                 "from a prefill worker" if kv_params else "computed here",
                 extra={"engine_request_id": request.request_id})
        stream = self.host.generate(
            request.request_id,
            list(request.prompt_token_ids),
            sampling_from_pb(request.sampling),
            kv_params,
        )
        async for chunk in stream:
            yield pb.GenerateChunk(
                token_ids=chunk.token_ids,
                text=chunk.text,
                finish_reason=chunk.finish_reason or "",
                num_prompt_tokens=chunk.num_prompt_tokens,
                num_cached_tokens=chunk.num_cached_tokens,
            )

    async def GenerateStream(self, request_iterator: AsyncIterator[pb.GenerateStreamRequest],
                             context: grpc.aio.ServicerContext) -> None:
        await serve_generate_stream(request_iterator, context, self.chunks)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> pb.AbortResponse:
        return pb.AbortResponse(found=await self.host.abort(request.request_id))

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ReleaseResponse:
        try:
            params = loads_params(request.kv_transfer_params_json)
        except ValueError:
            params = None
        if not params or not isinstance(params, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "kv_transfer_params_json empty or not a JSON object")
        params = admit(self.signer, request.request_id, params, self.kv_params_refused,
                       release=True, log=log)
        if params is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "kv_transfer_params not signed by this cluster")
        try:
            await self.host.release(request.request_id, params)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ReleaseResponse()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> pb.HealthResponse:
        cfg = self.host.cfg
        try:
            await self.host.check_health()
            healthy, message = True, "ok"
        except Exception as exc:  # the engine reports its own failure modes
            healthy, message = False, f"{type(exc).__name__}: {exc}"
        return pb.HealthResponse(healthy=healthy, worker_id=cfg.worker_id, role=cfg.role.value,
                                 model=cfg.engine.name, message=message)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
                    ) -> pb.StatsResponse:
        import time

        c = self.host.counters
        return pb.StatsResponse(
            worker_id=self.host.cfg.worker_id,
            role=self.host.cfg.role.value,
            in_flight=self.host.load().in_flight,  # worker API and engine link requests
            num_running_reqs=c.num_running_reqs,
            num_waiting_reqs=c.num_waiting_reqs,
            kv_cache_usage=c.kv_cache_usage,
            prefix_cache_queries=c.prefix_cache_queries,
            prefix_cache_hits=c.prefix_cache_hits,
            requests_total=c.requests_total,
            requests_aborted=c.requests_aborted,
            stats_age_s=time.time() - c.last_step_at if c.last_step_at else -1.0,
        )


def _log_id(value: str) -> str | None:
    """The caller's request id if it is a valid one (as the server interceptor checks)."""
    try:
        return request_ids.validate(value) if value else None
    except ValueError:
        return None


class RequestFailed(Exception):
    """One request on a GenerateStream fails with this gRPC status (the stream goes on)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


ChunkSource = Callable[[pb.GenerateRequest], AsyncIterator[pb.GenerateChunk]]


async def serve_generate_stream(request_iterator: AsyncIterator[pb.GenerateStreamRequest],
                                context: grpc.aio.ServicerContext, chunks: ChunkSource) -> None:
    """Serve a GenerateStream: run every started request's `chunks` in a task of its own and
    send what they produce batched, one message for all that is ready (normally one engine
    step). A request fails alone: `RequestFailed` with its status, ValueError as
    INVALID_ARGUMENT, anything else as UNAVAILABLE (the gateway migrates it). Cancelling a
    request, or the stream ending, cancels its task (the engine aborts the request)."""
    outbox: list[pb.GenerateStreamItem] = []
    ready = asyncio.Event()
    tasks: dict[str, asyncio.Task] = {}

    def emit(item: pb.GenerateStreamItem) -> None:
        outbox.append(item)
        ready.set()

    async def run(request: pb.GenerateRequest, caller_request_id: str) -> None:
        rid = request.request_id
        code, message = grpc.StatusCode.OK, ""
        with request_ids.bound(_log_id(caller_request_id) or rid):
            try:
                async for chunk in chunks(request):
                    emit(pb.GenerateStreamItem(request_id=rid, chunk=chunk))
            except RequestFailed as exc:
                code, message = exc.code, exc.message
            except ValueError as exc:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except Exception as exc:  # engine dead or failing: the gateway migrates it
                log.warning("generate %s failed: %s: %s", rid, type(exc).__name__, exc)
                code, message = grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}"
        emit(pb.GenerateStreamItem(request_id=rid, end=True, status_code=code.value[0],
                                   status_message=message))

    def start(request: pb.GenerateRequest, caller_request_id: str) -> None:
        rid = request.request_id
        if rid in tasks:
            emit(pb.GenerateStreamItem(
                request_id=rid, end=True, status_code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                status_message=f"request {rid} is already running on this stream"))
            return
        task = asyncio.create_task(run(request, caller_request_id))
        tasks[rid] = task
        task.add_done_callback(lambda t: tasks.pop(rid, None) if tasks.get(rid) is t else None)

    async def read() -> None:
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "start":
                start(msg.start, msg.caller_request_id)
            elif kind == "cancel_request_id" and (t := tasks.get(msg.cancel_request_id)):
                t.cancel()  # the engine request is aborted as the task unwinds

    reader = asyncio.create_task(read())
    reader.add_done_callback(lambda _: ready.set())
    try:
        while True:
            await ready.wait()
            ready.clear()
            await asyncio.sleep(0)  # let the other requests of this engine step emit too
            if outbox:
                batch = pb.GenerateStreamBatch(items=outbox)
                del outbox[:]
                await context.write(batch)
            if reader.done() and not tasks and not outbox:
                reader.result()  # a broken inbound stream ends the call with its error
                return
    finally:
        reader.cancel()
        for task in list(tasks.values()):
            task.cancel()
