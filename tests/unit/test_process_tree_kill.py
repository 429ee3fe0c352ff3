"""Killing a worker's process tree leaves no named semaphore of Python's multiprocessing in
/dev/shm: the resource tracker under the actor outlives the rest long enough to unlink them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from services.processes import is_resource_tracker, kill_tree_leaving_trackers

# An actor as a worker's: a spawn-context lock (a named semaphore its resource tracker
# registers, mapped by nobody once multiprocessing has set it up) and a spawned child (an engine)
ACTOR = """
import multiprocessing as mp, time
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    child = ctx.Process(target=time.sleep, args=(120,))
    child.start()
    print(lock._semlock.name, flush=True)
    time.sleep(120)
"""


def start_actor() -> tuple[subprocess.Popen[bytes], Path, list[psutil.Process]]:
    actor = subprocess.Popen([sys.executable, "-c", ACTOR], stdout=subprocess.PIPE)
    assert actor.stdout is not None
    name = actor.stdout.readline().decode().strip()
    assert name.startswith("/mp-"), name
    sem = Path("/dev/shm") / f"sem.{name[1:]}"
    assert sem.exists()
    tree = [psutil.Process(actor.pid), *psutil.Process(actor.pid).children(recursive=True)]
    return actor, sem, tree


def test_the_tracker_unlinks_the_semaphores_of_a_killed_tree() -> None:
    actor, sem, tree = start_actor()
    try:
        assert [p for p in tree if is_resource_tracker(p)], [p.cmdline() for p in tree]
        assert len(tree) == 3  # the actor, its tracker, its spawned child
        kill_tree_leaving_trackers(tree)
        assert not any(p.is_running() for p in tree)
        assert not sem.exists()
    finally:
        for p in tree:
            if p.is_running():
                p.kill()
        actor.wait()


def test_killing_the_tracker_with_the_rest_leaks_them() -> None:
    """The control: what the controller did before (every process SIGKILLed at once)."""
    actor, sem, tree = start_actor()
    try:
        for p in tree:
            p.kill()
        psutil.wait_procs(tree, timeout=5)
        assert sem.exists()
    finally:
        sem.unlink(missing_ok=True)
        for p in tree:
            if p.is_running():
                p.kill()
        actor.wait()
