"""The Ray actor that hosts one worker (engine + gRPC API) in its own process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from services.cluster_secret import ClusterSecret
from services.worker.config import WorkerConfig
from services.worker.process import WorkerEndpoints, WorkerProcess


def worker_pid_file(run_dir: Path, worker_id: str) -> Path:
    """Where a worker actor records its PID and host name."""
    return run_dir / "workers" / f"{worker_id}.pid"


class WorkerActor:
    """Ray actor shell around WorkerProcess; the controller wraps it with ray.remote().

    start() and drain() run once: a second call (a restarted controller adopting this worker,
    services/controller/adoption.py) waits for the first one's result."""

    def __init__(self, cfg_json: str) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = WorkerConfig.model_validate_json(cfg_json)
        # The controller kills a failed worker's process tree by this PID (even one that
        # never finished starting); see services/controller/pools.py.
        pid_file = worker_pid_file(self.cfg.run_dir, self.cfg.worker_id)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()} {socket.gethostname()}")
        self.proc = WorkerProcess(self.cfg)
        self._starting: asyncio.Task | None = None
        self._draining: asyncio.Task | None = None
        self._stopped = False

    async def start(self) -> dict:
        """Start the engine and API; returns WorkerEndpoints as a dict."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self.proc.start())
        endpoints: WorkerEndpoints = await asyncio.shield(self._starting)
        return endpoints.model_dump()

    async def stop(self) -> None:
        """Stop serving and shut the engine down (the actor can then be killed)."""
        self._stopped = True
        await self.proc.stop()

    async def drain(self, timeout_s: float) -> dict:
        """Finish in-flight requests without taking new ones, then stop (see WorkerProcess)."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self.proc.drain(timeout_s))
        result: dict = await asyncio.shield(self._draining)
        return result

    async def health(self) -> dict:
        """Whether the engine serves; {'healthy': bool, 'message': str, ...}."""
        return await self.proc.health()

    async def describe(self) -> dict:
        """What a restarted controller needs to adopt this worker: its config (JSON), its
        state (starting, serving, draining, stopped or failed), its endpoints once serving,
        and the fingerprint of the cluster secret it holds."""
        state = "starting"
        if self._stopped or (self._draining is not None and self._draining.done()):
            state = "stopped"
        elif self._draining is not None:
            state = "draining"
        elif self._starting is not None and self._starting.done():
            failed = self._starting.cancelled() or self._starting.exception() is not None
            state = "failed" if failed else "serving"
        elif self._starting is None:
            state = "created"  # start() never reached it
        secret = ClusterSecret.from_environment()
        return {"config": self.cfg.model_dump_json(), "state": state,
                "endpoints": (self.proc.endpoints.model_dump()
                              if state == "serving" and self.proc.endpoints else None),
                "secret_fingerprint": secret.fingerprint if secret else ""}

    async def ping(self) -> str:
        """Liveness of the actor itself."""
        return self.cfg.worker_id
