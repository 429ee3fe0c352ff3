"""The CPU niceness of every thread of this process. No vLLM import: unit-testable alone.

Linux keeps a niceness per thread (`setpriority(PRIO_PROCESS, tid)`), and a new thread or
process takes its creator's. A worker lowers its own threads' priority only once its engine
processes are running, so the engine keeps the niceness the worker started with."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def set_process_niceness(niceness: int) -> int:
    """Set every thread of this process to `niceness` where it is nicer than now (raising
    priority needs privileges a worker need not have); returns how many threads changed."""
    changed = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
        except OSError:  # the thread ended meanwhile, or not permitted
            continue
    return changed
