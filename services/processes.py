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


RESOURCE_TRACKER = "multiprocessing.resource_tracker"
"""In the command line of Python's resource tracker: the process multiprocessing starts to
unlink its named semaphores (/dev/shm/sem.mp-*) once every process of the program has gone."""


def is_resource_tracker(proc: psutil.Process) -> bool:
    """Whether `proc` is a Python multiprocessing resource tracker."""
    try:
        return any(RESOURCE_TRACKER in arg for arg in proc.cmdline())
    except psutil.Error:
        return False


def kill_tree_leaving_trackers(procs: list[psutil.Process], timeout_s: float = 5.0) -> None:
    """SIGKILL these processes, except their multiprocessing resource trackers: a tracker
    unlinks the named semaphores of the processes it served when they are all dead (they map
    no file a scan could find), so it is given `timeout_s` to do so, and killed after."""
    trackers = [p for p in procs if is_resource_tracker(p)]
    rest = [p for p in procs if p not in trackers]
    for p in rest:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(rest, timeout=timeout_s)
    kill_survivors(trackers, timeout_s)
