"""A private Redis Cluster on loopback: N primaries with R replicas each, stopped by PID."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import redis

from services.ports import free_port

__all__ = ["RedisClusterServer", "redis_cluster"]


@dataclass
class RedisClusterServer:
    """The running cluster: its nodes' ports and processes."""

    run_dir: Path
    ports: list[int]
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """A startup node's URL (any node serves as an entry point)."""
        return f"redis://{self.host}:{self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node."""
        return redis.Redis(host=self.host, port=port)

    def primaries(self) -> list[int]:
        """Ports of the nodes that are primaries now."""
        out = []
        for port in self.ports:
            if port in self.procs and self.procs[port].poll() is None:
                with contextlib.closing(self.node(port)) as c:
                    if c.info("replication")["role"] == "master":
                        out.append(port)
        return out

    def replica_of(self, primary: int) -> int:
        """Port of a replica of the primary on ``primary``."""
        with contextlib.closing(self.node(primary)) as c:
            info = c.info("replication")
        return int(info["slave0"]["port"])

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node reports cluster_state:ok and agrees on the slots."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ok = True
                for port in self.ports:
                    if self.procs[port].poll() is not None:
                        continue
                    with contextlib.closing(self.node(port)) as c:
                        info = c.cluster("info")
                        if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                            ok = False
                if ok:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok; see {self.run_dir}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate every node by PID (SIGTERM, then SIGKILL)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start_node(run_dir: Path, host: str, port: int, extra: list[str]) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: run scripts/install.sh (Debian package)")
    d = run_dir / str(port)
    d.mkdir()
    log = open(d / "redis.log", "ab")
    proc = subprocess.Popen(
        [binary, "--bind", host, "--port", str(port), "--cluster-enabled", "yes",
         "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "2000",
         "--save", "", "--appendonly", "no", "--dir", str(d), "--protected-mode", "yes", *extra],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return proc


@contextlib.contextmanager
def redis_cluster(primaries: int = 3, replicas: int = 1, host: str = "127.0.0.1",
                  extra: list[str] | None = None) -> Iterator[RedisClusterServer]:
    """Start ``primaries * (1 + replicas)`` cluster-enabled redis-servers, join them with
    ``redis-cli --cluster create``, yield the cluster, stop every node by PID."""
    with tempfile.TemporaryDirectory(prefix="splitserve-rcluster-") as d:
        ports: list[int] = []
        while len(ports) < primaries * (1 + replicas):
            # a cluster node also binds port + 10000 (its bus): both must be free
            p = free_port(host)
            if p + 10000 < 65536 and p not in ports:
                ports.append(p)
        srv = RedisClusterServer(Path(d), ports, host=host)
        try:
            for port in ports:
                srv.procs[port] = _start_node(srv.run_dir, host, port, extra or [])
            deadline = time.monotonic() + 10
            for port in ports:
                while True:
                    try:
                        with contextlib.closing(srv.node(port)) as c:
                            c.ping()
                        break
                    except redis.ConnectionError:
                        if srv.procs[port].poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"cluster node {port} did not start; see {d}")
                        time.sleep(0.05)
            subprocess.run(
                ["redis-cli", "--cluster", "create", *[f"{host}:{p}" for p in ports],
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                input=b"yes\n", capture_output=True, check=True, timeout=60)
            srv.wait_ok()
            yield srv
        finally:
            srv.stop()
