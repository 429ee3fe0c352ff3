"""A private Redis Cluster on loopback: N primaries with R replicas each, stopped by PID."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import redis

from services.ports import ephemeral_port_low, free_port

__all__ = ["RedisClusterServer", "redis_cluster"]


@dataclass
class RedisClusterServer:
    """The running cluster: its nodes' ports and processes."""

    run_dir: Path
    ports: list[int]
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    host: str = "127.0.0.1"
    extra: list[str] = field(default_factory=list)

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

    def wait_replicated(self, timeout_s: float = 60.0) -> None:
        """Until every running replica's link to its primary is up (a replica that never
        synced refuses to fail over: its data is too old)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pending = []
            for port in self.ports:
                if self.procs[port].poll() is not None:
                    continue
                try:
                    with contextlib.closing(self.node(port)) as c:
                        info = c.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        pending.append(port)
                except redis.RedisError:
                    pending.append(port)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {pending} not in sync; see {self.run_dir}")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        """Kill one node (SIGKILL: a crash, nothing saved)."""
        proc = self.procs[port]
        proc.kill()
        proc.wait()

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Start a stopped node again, on its port and directory: it rejoins the cluster
        from its nodes.conf (as a replica, if it was failed over meanwhile)."""
        self.procs[port] = proc = _start_node(self.run_dir, self.host, port, self.extra)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with contextlib.closing(self.node(port)) as c:
                    c.ping()
                return
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node {port} did not restart; see {self.run_dir}")
                time.sleep(0.05)

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


def _free_node_port(host: str, taken: list[int]) -> int:
    """A port whose cluster bus port (port + 10000) is free too, both below the kernel's
    ephemeral range where one is known (a port there may be taken by any outgoing connection
    between this check and the node's bind: seen as 'cluster node N did not start')."""
    low = ephemeral_port_low()
    span = range(20000, low - 10000) if low - 10000 > 20000 + 64 else range(0)
    for _ in range(500):
        port = random.choice(span) if span else free_port(host)
        if port in taken or port + 10000 >= 65536:
            continue
        if all(_bindable(host, p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _start_node_on_free_ports(srv: RedisClusterServer, extra: list[str], tries: int = 5) -> None:
    """Start one node and wait for its PING; a node that exits first (its port was taken
    meanwhile) is started again on other ports."""
    for _ in range(tries):
        port = _free_node_port(srv.host, srv.ports)
        proc = _start_node(srv.run_dir, srv.host, port, extra)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with contextlib.closing(srv.node(port)) as c:
                    c.ping()
                srv.ports.append(port)
                srv.procs[port] = proc
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise RuntimeError(f"a cluster node did not start in {tries} tries; see {srv.run_dir}")


def _start_node(run_dir: Path, host: str, port: int, extra: list[str]) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: run scripts/install.sh (Debian package)")
    d = run_dir / str(port)
    d.mkdir(exist_ok=True)
    log = open(d / "redis.log", "ab")
    proc = subprocess.Popen(
        [binary, "--bind", host, "--port", str(port), "--cluster-enabled", "yes",
         "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "2000",
         # (a later --cluster-node-timeout in `extra` overrides it)
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
        srv = RedisClusterServer(Path(d), [], host=host, extra=list(extra or []))
        try:
            for _ in range(primaries * (1 + replicas)):
                _start_node_on_free_ports(srv, srv.extra)
            subprocess.run(
                ["redis-cli", "--cluster", "create", *[f"{host}:{p}" for p in srv.ports],
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                input=b"yes\n", capture_output=True, check=True, timeout=60)
            srv.wait_ok()
            yield srv
        finally:
            srv.stop()
