"""The Ray actor that hosts one worker (engine + gRPC API) in its own process."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from services.worker.config import WorkerConfig
from services.worker.process import WorkerEndpoints, WorkerProcess


def worker_pid_file(run_dir: Path, worker_id: str) -> Path:
    """Where a worker actor records its PID and host name."""
    return run_dir / "workers" / f"{worker_id}.pid"


class WorkerActor:
    """Ray actor shell around WorkerProcess; the controller wraps it with ray.remote()."""

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

    async def start(self) -> dict:
        """Start the engine and API; returns WorkerEndpoints as a dict."""
        endpoints: WorkerEndpoints = await self.proc.start()
        return endpoints.model_dump()

    async def stop(self) -> None:
        """Stop serving and shut the engine down (the actor can then be killed)."""
        await self.proc.stop()

    async def drain(self, timeout_s: float) -> dict:
        """Finish in-flight requests without taking new ones, then stop (see WorkerProcess)."""
        return await self.proc.drain(timeout_s)

    async def health(self) -> dict:
        """Whether the engine serves; {'healthy': bool, 'message': str, ...}."""
        return await self.proc.health()

    async def ping(self) -> str:
        """Liveness of the actor itself."""
        return self.cfg.worker_id
