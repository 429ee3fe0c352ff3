"""CPU time of a target's processes, grouped by role."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from bench.cpu_usage import cpu_seconds, group_of, usage

BUSY = ("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\ntime.sleep(30)")


def test_groups_and_cores_used() -> None:
    # a child whose command line names it the gateway, spending ~0.3 s of CPU, then idling
    child = subprocess.Popen([sys.executable, "-c", BUSY, "services.cli gateway"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert group_of(psutil.Process(child.pid)) == "gateway"
        before = cpu_seconds(os.getpid())
        assert before[child.pid][0] == "gateway"
        t0 = time.perf_counter()
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        # the child says when it has spent its CPU; waiting for a CPU total instead races the
        # 10 ms ticks of the kernel's accounting and the child's exit, after which its name
        # can no longer be read
        assert child.stdout.readline() == b"done\n"
        after = cpu_seconds(os.getpid())
        assert after[child.pid][0] == "gateway"
        assert after[child.pid][1] - before[child.pid][1] >= 0.25
        cores = usage(before, after, time.perf_counter() - t0)
        assert 0 < cores["gateway"] <= 1.1
        assert list(cores) == sorted(cores, key=lambda g: -cores[g])
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == {}  # gone: nothing to count
