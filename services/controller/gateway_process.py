"""Runs a gateway as a child process of `splitserve up` and waits until it can route."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.cluster_secret import ENV, FILE_ENV
from services.gateway.config import GatewayConfig


class GatewayProcess:
    """`splitserve gateway` in a subprocess, logging to the run directory; it reads the
    cluster secret from `secret_file` (mode 0600; never on its command line)."""

    def __init__(self, cfg: GatewayConfig, run_dir: Path, secret_file: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.secret_file = secret_file
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def start(self) -> None:
        log = open(self.run_dir / "gateway.log", "ab")
        env = {k: v for k, v in os.environ.items() if k != ENV}
        env[FILE_ENV] = str(self.secret_file)
        # the configuration (its Redis URL may carry a password) goes by stdin, not argv,
        # which every user of the machine can read
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway", "--config-json", "-"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env,
        )
        log.close()
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.cfg.model_dump_json().encode())
        self.proc.stdin.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Until /health says the gateway can route (it sees live workers)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited; see {self.run_dir}/gateway.log")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready after {timeout_s:.0f}s; see gateway.log")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
