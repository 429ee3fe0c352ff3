"""The CPU-affinity helpers splitserve's NIXL connector wraps vLLM's connector start in
(services/worker/cpu_affinity.py; the connector itself is exercised by the e2e tests)."""

from __future__ import annotations

import os

from services.worker.cpu_affinity import (restore_thread_affinity, thread_affinity,
                                          usable_numa_cores)


def test_reserved_kv_cores_stay_inside_the_allowed_cpuset() -> None:
    # vllm#58033: host topology has cores the container may not use
    assert usable_numa_cores([[0, 1, 2, 3], [4, 5, 6, 7]], {2, 3}) == [[2, 3]]
    assert usable_numa_cores([[0, 1], [2, 3]], {0, 1, 2, 3}) == [[0, 1], [2, 3]]
    assert usable_numa_cores([[0, 1]], set()) == []
    assert usable_numa_cores([], {0}) == []


def test_thread_affinity_is_put_back_after_a_change() -> None:
    before = thread_affinity()
    assert before == set(os.sched_getaffinity(0))
    one = {min(before)}
    os.sched_setaffinity(0, one)  # what vLLM's connector does to the engine thread
    try:
        assert set(os.sched_getaffinity(0)) == one
        restore_thread_affinity(before)
        assert set(os.sched_getaffinity(0)) == before
    finally:
        os.sched_setaffinity(0, before)
