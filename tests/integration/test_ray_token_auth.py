"""Ray's token authentication as the Helm chart turns it on (RAY_AUTH_MODE=token, the token in
a file named by RAY_AUTH_TOKEN_PATH; docs/security.md): a real local Ray head refuses a client
without the token or with another one, and lets one with the token connect. The refusals go
through `ray health-check`, what KubeRay's wait-gcs-ready init container runs before a worker
pod's `ray start`; the connection through `ray.init(address=...)`, what the controller runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.ray_head import RAY, ray_env, ray_head

TOKEN = "splitserve-test-ray-token-0123456789abcdef"
CONNECT = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, "
           "_node_ip_address='127.0.0.1'); print('CPUs', ray.cluster_resources()['CPU']); "
           "ray.shutdown()")


@pytest.fixture
def head(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Ray head with token authentication (the token in a file, as the chart mounts it)."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    env = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    with ray_head(tmp_path / "head.log", env=env) as address:
        yield address, token


def test_head_refuses_clients_without_the_token(head: tuple[str, Path]) -> None:
    address, token = head
    strangers = {
        "no token (authentication off)": ray_env(RAY_AUTH_MODE="disabled"),
        "another token": ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 40),
    }
    for who, env in strangers.items():
        out = subprocess.run([RAY, "health-check", "--address", address], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, (who, out.stdout, out.stderr)
        assert "token" in (out.stdout + out.stderr).lower(), (who, out.stderr)
    holder = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    out = subprocess.run([RAY, "health-check", "--address", address], env=holder,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", CONNECT, address], env=holder,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "CPUs 1.0" in out.stdout, out.stderr[-2000:]
