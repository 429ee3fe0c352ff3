"""Where a target's CPU time goes during a run: CPU seconds of every process under the target's
root process (a `splitserve up` or a vLLM server this benchmark started), grouped by role.

On a 2-core machine a serving path that spends more CPU per token than another loses
throughput to it; this says which process spends it (gateway, worker actor, engine, ...).
"""

from __future__ import annotations

import psutil

GROUPS: tuple[tuple[str, str], ...] = (
    ("VLLM::EngineCore", "engine core"),
    ("VLLM::Worker", "engine worker"),
    ("ray::WorkerActor", "worker actor"),
    ("services.cli gateway", "gateway"),
    ("vllm.entrypoints", "vLLM API server"),
    ("redis-server", "redis"),
    ("ray::", "ray (other)"),
    ("gcs_server", "ray (other)"),
    ("raylet", "ray (other)"),
    ("services.cli up", "controller"),
)


def group_of(proc: psutil.Process) -> str:
    """A process's role, from its name and command line."""
    try:
        text = " ".join([proc.name(), *proc.cmdline()])
    except psutil.Error:
        return "other"
    for needle, group in GROUPS:
        if needle in text:
            return group
    return "other"


def cpu_seconds(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (group, user + system CPU seconds) for the root and all its descendants."""
    out: dict[int, tuple[str, float]] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (group_of(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def usage(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
          wall_s: float) -> dict[str, float]:
    """Cores used per group over `wall_s` (CPU seconds / wall seconds), largest first.
    Processes that ended during the run are not counted."""
    cores: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        prev = before.get(pid, (group, 0.0))[1]
        cores[group] = cores.get(group, 0.0) + max(0.0, cpu - prev) / max(wall_s, 1e-9)
    return dict(sorted(((g, round(c, 3)) for g, c in cores.items() if c > 0.0005),
                       key=lambda kv: -kv[1]))
