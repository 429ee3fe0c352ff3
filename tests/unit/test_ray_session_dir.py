"""Ray's session directory of a local Ray: short when the run directory is deep, and settled
into the run directory (its logs kept, the rest removed) once Ray has stopped."""

from __future__ import annotations

from pathlib import Path

from services.controller.ray_session_dir import (MAX_DEPTH, ray_session_dir,
                                                 settle_ray_session_dir)


def _session(root: Path, name: str = "session_2026-12-07_10-00-00_000000_1") -> Path:
    logs = root / name / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.out").write_text("raylet started\n")
    (root / name / "sockets").mkdir()
    (root / "session_latest").symlink_to(root / name, target_is_directory=True)
    return root / name


def test_a_deep_run_dir_gets_a_short_linked_dir_whose_logs_join_it_at_stop(tmp_path: Path
                                                                           ) -> None:
    run_dir = tmp_path / ("deep" * 12) / "run"
    run_dir.mkdir(parents=True)
    short = ray_session_dir(run_dir)
    assert len(str(short)) <= MAX_DEPTH and short.is_dir()
    assert (run_dir / "ray").is_symlink() and (run_dir / "ray").resolve() == short.resolve()
    session = _session(short)

    settle_ray_session_dir(run_dir, short)

    assert not short.exists()
    kept = run_dir / "ray" / session.name / "logs" / "raylet.out"
    assert not (run_dir / "ray").is_symlink()
    assert kept.read_text() == "raylet started\n"
    assert not (run_dir / "ray" / session.name / "sockets").exists()


def test_a_shallow_run_dir_holds_ray_itself_and_is_left_alone(tmp_path: Path) -> None:
    run_dir = Path("/tmp") / tmp_path.name[-8:]
    run_dir.mkdir(exist_ok=True)
    try:
        d = ray_session_dir(run_dir)
        assert d == run_dir / "ray" and not d.is_symlink()
        d.mkdir()
        session = _session(d)
        settle_ray_session_dir(run_dir, d)
        assert (session / "logs" / "raylet.out").exists() and (session / "sockets").exists()
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
