"""The Ray actor that hosts one worker (engine + gRPC API) in its own process."""

from __future__ import annotations

import logging

from services.worker.config import WorkerConfig
from services.worker.process import WorkerEndpoints, WorkerProcess


class WorkerActor:
    """Ray actor shell around WorkerProcess; the controller wraps it with ray.remote()."""

    def __init__(self, cfg_json: str) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = WorkerConfig.model_validate_json(cfg_json)
        self.proc = WorkerProcess(self.cfg)

    async def start(self) -> dict:
        """Start the engine and API; returns WorkerEndpoints as a dict."""
        endpoints: WorkerEndpoints = await self.proc.start()
        return endpoints.model_dump()

    async def stop(self) -> None:
        """Stop serving and shut the engine down (the actor can then be killed)."""
        await self.proc.stop()

    async def ping(self) -> str:
        """Liveness of the actor itself."""
        return self.cfg.worker_id
