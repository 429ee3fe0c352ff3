"""Shared-memory segments of a worker's engine processes, so none outlives the worker.

vLLM's engine core creates a POSIX shared-memory ring buffer (/dev/shm/psm_*, ~160 MiB) for
its executor and unlinks it only from a finalizer, which never runs when the engine-core
process is terminated at shutdown. The worker records the segments its engine processes map
once they are up, and unlinks whichever still exist after the engine has stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")


def segments_mapped_by_children(pid: int | None = None) -> set[Path]:
    """/dev/shm files mapped by the descendants of `pid` (default: this process)."""
    try:
        procs = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return set()
    return segments_mapped_by(procs)


def segments_mapped_by(procs: list[psutil.Process]) -> set[Path]:
    """/dev/shm files the given processes map now (engines create some lazily, e.g. the
    named semaphores of Python's multiprocessing, /dev/shm/sem.mp-*)."""
    found: set[Path] = set()
    for proc in procs:
        try:
            for m in proc.memory_maps(grouped=True):
                if m.path.startswith(f"{SHM_DIR}/"):
                    found.add(Path(m.path.split(" (deleted)")[0]))
        except psutil.Error:
            continue
    return found


def unlink_segments(paths: set[Path]) -> list[Path]:
    """Remove the given segments that still exist; returns those removed."""
    removed = []
    for p in paths:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
