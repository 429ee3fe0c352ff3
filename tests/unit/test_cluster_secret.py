"""The cluster secret: where it comes from, how it is kept, what is derived from it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.cluster_secret import ENV, FILE_ENV, ClusterSecret, ClusterSecretError


def test_generated_secrets_differ_and_derive_distinct_credentials() -> None:
    a, b = ClusterSecret.generate(), ClusterSecret.generate()
    assert a.text != b.text and len(a.text) >= 32
    assert a.grpc_token != b.grpc_token and a.redis_password != b.redis_password
    purposes = {a.derive(p) for p in (b"one", b"two", b"three")}
    assert len(purposes) == 3 and all(len(d) == 32 for d in purposes)
    assert a.derive(b"one") == ClusterSecret.from_text(a.text).derive(b"one")  # deterministic
    assert a.text not in repr(a) and a.text not in str(a)


def test_written_file_is_private_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "cluster-secret"
    path.write_text("old")
    path.chmod(0o644)  # an existing file loses its looser mode
    s = ClusterSecret.generate()
    s.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ClusterSecret.read(path).grpc_token == s.grpc_token


def test_configuration_order_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("from-the-file-0123456789\n")  # an editor's final newline is not part of it
    other = tmp_path / "o"
    other.write_text("from-the-other-file-0123456789")
    env_secret = ClusterSecret.from_environment({ENV: "from-the-environment-0123", FILE_ENV: str(f)})
    assert env_secret is not None and env_secret.text == "from-the-environment-0123"
    from_file = ClusterSecret.from_environment({FILE_ENV: str(f)}, file=other)
    assert from_file is not None and from_file.text == "from-the-file-0123456789"
    given = ClusterSecret.from_environment({}, file=other)
    assert given is not None and given.text == "from-the-other-file-0123456789"
    assert ClusterSecret.from_environment({}) is None
    with pytest.raises(ClusterSecretError, match="at least 16 bytes"):
        ClusterSecret.from_text("short")
    with pytest.raises(ClusterSecretError, match="cannot read the cluster secret file"):
        ClusterSecret.from_environment({FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(ClusterSecretError, match=r"the gateway needs the cluster secret.*"
                       r"SPLITSERVE_CLUSTER_SECRET"):
        ClusterSecret.required("the gateway", {})
