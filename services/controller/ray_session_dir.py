"""Where a local Ray keeps its session (sockets, logs), and what is left of it after a stop.

Ray's AF_UNIX socket paths must fit in 107 bytes, and its session directory adds about 65, so
a run directory deeper than ``MAX_DEPTH`` gets Ray's directory in the system temp dir instead,
linked from ``run_dir/ray``. Once Ray has stopped, its logs move into ``run_dir/ray`` (the
link becomes a real directory) and the temp directory goes: a run directory then holds all of
a run's logs, and nothing is left under /tmp.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MAX_DEPTH = 40
"""Longest run_dir/ray path Ray's sockets fit under."""


def ray_session_dir(run_dir: Path) -> Path:
    """Ray's ``_temp_dir``: run_dir/ray, or a short directory in the system temp dir linked
    from it when run_dir/ray is too deep for Ray's sockets."""
    wanted = run_dir / "ray"
    if len(str(wanted)) <= MAX_DEPTH:
        return wanted
    short = Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp"))
    if not wanted.exists() and not wanted.is_symlink():
        wanted.symlink_to(short, target_is_directory=True)
    log.info("Ray session directory %s (run_dir/ray is too deep for its sockets)", short)
    return short


def settle_ray_session_dir(run_dir: Path, session_dir: Path) -> None:
    """After Ray stopped: keep its sessions' logs in run_dir/ray and remove ``session_dir``
    when it is a short directory outside run_dir (ray_session_dir)."""
    link = run_dir / "ray"
    if session_dir == link or not session_dir.is_dir():
        return
    if link.is_symlink() and link.resolve() == session_dir.resolve():
        link.unlink()
    link.mkdir(parents=True, exist_ok=True)
    for session in sorted(session_dir.glob("session_*")):
        logs = session / "logs"
        if session.is_symlink() or not logs.is_dir():
            continue
        target = link / session.name / "logs"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(str(logs), str(target))
        except OSError as exc:
            log.warning("could not keep Ray's logs of %s (%s)", session.name, exc)
    shutil.rmtree(session_dir, ignore_errors=True)
