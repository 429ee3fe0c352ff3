"""A worker steps its own threads back behind its engine (services/worker/thread_niceness.py).

Run in a child interpreter: niceness cannot be lowered again without privileges."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, os, subprocess, sys, threading
from services.worker.thread_niceness import set_process_niceness

base = os.getpriority(os.PRIO_PROCESS, 0)
ready, done = threading.Event(), threading.Event()
tid = {}
def before():
    tid["before"] = threading.get_native_id(); ready.set(); done.wait()
t = threading.Thread(target=before); t.start(); ready.wait()
changed = set_process_niceness(base + 3)
again = set_process_niceness(base + 1)  # never raises priority back
after = {}
def later():
    after["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
t2 = threading.Thread(target=later); t2.start(); t2.join()
child = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"],
                       capture_output=True, text=True, check=True).stdout.strip()
out = {"base": base, "changed": changed, "again": again,
       "main": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
       "before": os.getpriority(os.PRIO_PROCESS, tid["before"]),
       "later": after["nice"], "child": int(child)}
done.set(); t.join()
print(json.dumps(out))
"""


def test_every_thread_and_what_it_starts_later_step_back() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    want = min(out["base"] + 3, 19)
    assert out["changed"] >= 2, out  # the main thread and the one already running
    assert out["again"] == 0, out  # a lower niceness than now changes nothing
    assert out["main"] == out["before"] == out["later"] == out["child"] == want, out
