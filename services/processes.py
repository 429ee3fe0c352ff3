"""Stopping processes by PID: what every stop path of the project does last."""

from __future__ import annotations

import psutil


def kill_survivors(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to `timeout_s` for these processes to exit, SIGKILL those that did not;
    returns the ones that had to be killed."""
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return alive
