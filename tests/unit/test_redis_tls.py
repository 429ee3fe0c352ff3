"""Redis over TLS (rediss:// URLs, SPLITSERVE_REDIS_TLS_* files) against a real redis-server
that serves TLS only and requires client certificates: splitserve's clients verify the server
against the configured CA and present their certificate; a client without the CA, without a
certificate or on plain TCP is refused; the registry and the prefix index work over it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
from redis.exceptions import RedisError

from router.prefix_index import PrefixIndex
from router.redis_client import RedisClientConfig, redis_client, sync_redis_client
from router.registry import WorkerInfo, WorkerRegistry, WorkerRole
from services.ports import free_port
from tests.support.tls import Pki, make_pki


@contextlib.contextmanager
def tls_redis(tmp: Path, pki: Pki) -> Iterator[int]:
    """A redis-server on loopback that speaks TLS only (no plain port), requires client
    certificates signed by the CA; yields its port; stopped by PID."""
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", "0",
         "--tls-port", str(port), "--tls-cert-file", str(pki.server_cert),
         "--tls-key-file", str(pki.server_key), "--tls-ca-cert-file", str(pki.ca_cert),
         "--tls-auth-clients", "yes", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        stdout=open(tmp / "redis.log", "ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while "Ready to accept connections" not in (tmp / "redis.log").read_text():
            assert proc.poll() is None, (tmp / "redis.log").read_text()
            assert time.monotonic() < deadline, (tmp / "redis.log").read_text()
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[int]:
    with tls_redis(tmp_path_factory.mktemp("redis-tls"), pki) as port:
        yield port


def _config(pki: Pki, **changes: str) -> RedisClientConfig:
    base = dict(tls_ca_file=str(pki.ca_cert), tls_cert_file=str(pki.client_cert),
                tls_key_file=str(pki.client_key))
    return RedisClientConfig(**{**base, **changes})


def test_clients_reach_a_tls_redis_with_the_ca_and_their_certificate(
        pki: Pki, tls_port: int) -> None:
    url = f"rediss://127.0.0.1:{tls_port}/0"
    sync = sync_redis_client(url, _config(pki))
    try:
        sync.set("splitserve:tls:probe", b"over tls")
        assert sync.get("splitserve:tls:probe") == b"over tls"
    finally:
        sync.close()

    async def registry_and_index() -> None:
        client = redis_client(url, _config(pki))
        try:
            registry = WorkerRegistry(client)
            info = WorkerInfo(worker_id="w-tls", role=WorkerRole.BOTH, address="127.0.0.1:1",
                              model="m", block_size=16, hash_algo="sha256", hash_seed="0")
            await registry.register(info)
            assert [w.worker_id for w in await registry.live_workers()] == ["w-tls"]
            index = PrefixIndex(client)
            await index.add_blocks("w-tls", [11, 12, 13])
            assert (await index.longest_prefixes([11, 12, 13, 14], ["w-tls"]))["w-tls"] == 3
        finally:
            await client.aclose()

    asyncio.run(registry_and_index())


def test_a_client_without_the_ca_does_not_trust_the_server(pki: Pki, tls_port: int) -> None:
    client = sync_redis_client(f"rediss://127.0.0.1:{tls_port}/0", _config(pki, tls_ca_file=""))
    try:
        with pytest.raises(redis.ConnectionError, match="(?i)certificate verify failed"):
            client.ping()
    finally:
        client.close()


def test_a_client_without_a_certificate_is_refused(pki: Pki, tls_port: int) -> None:
    cfg = RedisClientConfig(tls_ca_file=str(pki.ca_cert))
    client = sync_redis_client(f"rediss://127.0.0.1:{tls_port}/0", cfg)
    try:
        with pytest.raises(RedisError):
            client.ping()
    finally:
        client.close()


def test_the_server_name_is_checked(tmp_path: Path) -> None:
    """A server whose certificate (from the trusted CA) names another host is not trusted."""
    other = make_pki(tmp_path, server_host="127.0.0.2")  # also names localhost, not 127.0.0.1
    (tmp_path / "srv").mkdir()
    with tls_redis(tmp_path / "srv", other) as port:
        client = sync_redis_client(f"rediss://127.0.0.1:{port}/0", _config(other))
        try:
            with pytest.raises(redis.ConnectionError, match="(?i)mismatch|doesn't match"):
                client.ping()
        finally:
            client.close()
        named = sync_redis_client(f"rediss://localhost:{port}/0", _config(other))
        try:
            assert named.ping()  # the name its certificate gives
        finally:
            named.close()


def test_tls_files_with_a_plain_url_are_a_configuration_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="rediss://"):
        sync_redis_client("redis://127.0.0.1:6379/0", _config(pki))
    with pytest.raises(ValueError, match="set both or neither"):
        RedisClientConfig(tls_cert_file=str(pki.client_cert))


def test_plain_tcp_to_the_tls_port_gets_no_answer(tls_port: int) -> None:
    client = sync_redis_client(f"redis://127.0.0.1:{tls_port}/0", RedisClientConfig())
    try:
        with pytest.raises(RedisError):
            client.ping()
    finally:
        client.close()
