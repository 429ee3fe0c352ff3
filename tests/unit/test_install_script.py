"""scripts/install.sh's profiles and stamp: a serve-only install (scripts/up.sh) is not taken
for a full one (scripts/test.sh), a full one satisfies both; run through the real script's
--stamp-hash and --check modes, which install nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install.sh"


def _run(venv: Path, profile: str | None, *args: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ, SPLITSERVE_VENV=str(venv), SPLITSERVE_DEVICE="cpu")
    env.pop("SPLITSERVE_INSTALL", None)
    if profile is not None:
        env["SPLITSERVE_INSTALL"] = profile
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_profiles_have_their_own_stamps(tmp_path: Path) -> None:
    serve = _run(tmp_path, "serve", "--stamp-hash").stdout.strip()
    full = _run(tmp_path, "full", "--stamp-hash").stdout.strip()
    assert len(serve) == len(full) == 64 and serve != full
    assert _run(tmp_path, None, "--stamp-hash").stdout.strip() == full  # default: full


def test_a_serve_install_is_not_a_full_one(tmp_path: Path) -> None:
    stamp = tmp_path / ".splitserve-installed"
    assert _run(tmp_path, "serve", "--check").returncode == 1  # nothing installed yet
    stamp.write_text(_run(tmp_path, "serve", "--stamp-hash").stdout.strip())
    assert _run(tmp_path, "serve", "--check").returncode == 0
    assert _run(tmp_path, "full", "--check").returncode == 1  # test.sh installs the rest
    stamp.write_text(_run(tmp_path, "full", "--stamp-hash").stdout.strip())
    assert _run(tmp_path, "full", "--check").returncode == 0
    assert _run(tmp_path, "serve", "--check").returncode == 0  # full includes serve
    stamp.write_text("0" * 64)  # inputs changed since (another script, pyproject, device)
    assert _run(tmp_path, "serve", "--check").returncode == 1


def test_bad_profile_and_argument_are_refused(tmp_path: Path) -> None:
    out = _run(tmp_path, "tests", "--check")
    assert out.returncode == 2 and "must be serve or full" in out.stderr
    out = _run(tmp_path, "serve", "--bogus")
    assert out.returncode == 2 and "unknown argument" in out.stderr


def test_up_installs_serve_and_test_installs_full() -> None:
    up = (REPO / "scripts" / "up.sh").read_text()
    test = (REPO / "scripts" / "test.sh").read_text()
    assert 'SPLITSERVE_INSTALL="${SPLITSERVE_INSTALL:-serve}" "$repo/scripts/install.sh"' in up
    assert 'SPLITSERVE_INSTALL=full "$repo/scripts/install.sh"' in test
