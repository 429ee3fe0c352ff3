"""A private Redis server for a cluster that was not given one (`up` without --redis-url), and
its supervisor: a private Redis that dies is started again on the same port and directory.

It binds loopback and requires a password (derived from the cluster secret), so another user
or process of the machine cannot read or write the cluster's registry, index or pool sizes. The
password is in its configuration file (mode 0600 in the run directory), never on a command
line; clients carry it in the URL (`redis://:PASSWORD@127.0.0.1:PORT/0`).

It runs without persistence, so a restarted server is empty; the cluster fills it again by
itself: each worker's next heartbeat registers it again (router/registry.py), each worker's
index updater writes its engine's cached blocks back from its mirror (router/index_updater.py,
an audit every 2 s), and the controller writes the desired pool sizes back
(services/controller/reconciler.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import redis

from router.redis_client import sync_redis_client
from services.ports import free_port

log = logging.getLogger(__name__)


class RedisServer:
    """Starts redis-server on loopback with no persistence (and `password`, unless empty);
    stops it by PID."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 password: str = "") -> None:
        self.run_dir = run_dir
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def _config_file(self) -> Path:
        """The server's configuration: the password, readable by this user only."""
        path = self.run_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if self.password:
                os.write(fd, f"requirepass {self.password}\n".encode())
        finally:
            os.close(fd)
        return path

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server (again, after it died: same port, same directory) and wait until
        it answers PING; returns its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run scripts/install.sh (Debian package)")
        log_file = open(self.run_dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [binary, str(self._config_file()), "--bind", self.host, "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.run_dir), "--protected-mode", "yes"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log_file.close()
        client = sync_redis_client(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return self.url
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server did not start; see {self.run_dir}/redis.log")
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RedisSupervisor:
    """Watches a private :class:`RedisServer` from a thread and starts it again when it dies
    (same port and directory, so every client's URL stays valid). A server that fails to come
    back is tried again with a backoff doubling up to ``max_backoff_s``."""

    def __init__(self, server: RedisServer, interval_s: float = 0.5,
                 max_backoff_s: float = 10.0) -> None:
        self.server = server
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="redis-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (before the server is stopped on purpose)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        backoff = self.interval_s
        while not self._stop.wait(backoff if not self.server.running else self.interval_s):
            proc = self.server.proc
            if proc is None or proc.poll() is None:
                backoff = self.interval_s
                continue
            log.error("the private redis-server (pid %d) exited with %s; starting it again on "
                      "port %d (workers re-register and rebuild the prefix index from their "
                      "mirrors)", proc.pid, proc.returncode, self.server.port)
            try:
                self.server.start()
            except (RuntimeError, OSError) as exc:
                backoff = min(self.max_backoff_s, backoff * 2)
                log.error("could not start redis-server again (%s); next try in %.1fs", exc,
                          backoff)
                continue
            self.restarts += 1
            backoff = self.interval_s
            log.warning("private redis-server running again (pid %d, restart %d)",
                        self.server.proc.pid if self.server.proc else -1, self.restarts)
