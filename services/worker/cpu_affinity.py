"""A thread's CPU affinity, kept or put back around code that changes it (vLLM's NIXL
connector on CPU; services/worker/nixl_connector.py). No vLLM import: unit-testable alone."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def thread_affinity() -> set[int] | None:
    """The calling thread's CPU affinity, where the platform has one."""
    getter = getattr(os, "sched_getaffinity", None)
    return set(getter(0)) if getter is not None else None


def restore_thread_affinity(affinity: set[int] | None) -> None:
    """Put the calling thread's CPU affinity back to `affinity` if something changed it."""
    if affinity is None:
        return
    now = set(os.sched_getaffinity(0))
    if now != affinity:
        os.sched_setaffinity(0, affinity)
        log.info("NIXL connector start moved the engine thread to cores %s; restored %s",
                 sorted(now), sorted(affinity))


def usable_numa_cores(numa_cores: list[list[int]], allowed: set[int]) -> list[list[int]]:
    """Per-NUMA-node core lists limited to `allowed` (nodes left with none are dropped: vLLM
    takes the largest core id of each list)."""
    out = [[c for c in cores if c in allowed] for cores in numa_cores]
    return [cores for cores in out if cores]
