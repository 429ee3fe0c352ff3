"""Where a running `splitserve up` can be found on this machine: one state file per cluster.

`up` writes ``<state dir>/clusters/<namespace>.<pid>.json`` once it serves and removes it when it
stops; `splitserve status` and `splitserve scale` read it when no ``--redis-url`` is given. The
state dir is ``$SPLITSERVE_STATE_DIR``, else ``$XDG_STATE_HOME/splitserve``, else
``~/.local/state/splitserve``. A file whose process is gone (an `up` that was SIGKILLed) is
stale: it names no cluster.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, Field, ValidationError


class ClusterState(BaseModel):
    """What `up` publishes about itself."""

    namespace: str = Field(description="Redis key namespace of the cluster")
    redis_url: str = Field(description="the cluster's Redis (private or given)")
    private_redis: bool = Field(description="whether `up` started that Redis itself")
    http: str = Field("", description="gateway HTTP base URL; empty: no gateway")
    grpc: str = Field("", description="gateway public gRPC address; empty: off")
    run_dir: str = Field(description="the run directory (logs, sockets)")
    pid: int = Field(description="process id of `splitserve up`")
    pid_started_at: float = Field(description="that process's start (process_started_at: guards PID reuse)")
    written_at: float = Field(default_factory=time.time, description="unix time written")


class NoCluster(LookupError):
    """No (single) running cluster was found; the message says why."""


def state_dir(environ: dict[str, str] | None = None) -> Path:
    """The directory state files live in (see the module doc)."""
    env = os.environ if environ is None else environ
    if explicit := env.get("SPLITSERVE_STATE_DIR"):
        return Path(explicit)
    xdg = env.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "splitserve"


def _clusters_dir(directory: Path | None) -> Path:
    return (directory or state_dir()) / "clusters"


def process_started_at(pid: int) -> float:
    """When a process started, as a value that identifies it with its PID; 0 if it does not
    exist. On Linux its start in clock ticks since boot (/proc/PID/stat): psutil's
    create_time adds the boot time, which moves when the wall clock is stepped (seen: a
    running `up` taken for gone a minute after it wrote its state file)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces: the fields after its ')' are fixed
            return float(f.read().rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        return 0.0
    except (OSError, IndexError, ValueError):
        pass
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def is_running(state: ClusterState) -> bool:
    """Whether the `up` process that wrote ``state`` still runs (same PID, same start)."""
    started = process_started_at(state.pid)
    return started > 0 and started == state.pid_started_at


def write_state(state: ClusterState, directory: Path | None = None) -> Path:
    """Write ``state`` atomically (readable by its owner only); returns the file."""
    d = _clusters_dir(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{state.namespace}.{state.pid}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.model_dump_json(indent=2))
    os.replace(tmp, path)
    return path


def remove_state(path: Path) -> None:
    """Remove a state file (idempotent)."""
    path.unlink(missing_ok=True)


def read_states(namespace: str, directory: Path | None = None
                ) -> tuple[list[ClusterState], list[Path]]:
    """The live clusters of ``namespace`` (oldest first) and the stale files found."""
    live: list[ClusterState] = []
    stale: list[Path] = []
    d = _clusters_dir(directory)
    for path in sorted(d.glob(f"{namespace}.*.json")) if d.is_dir() else []:
        try:
            state = ClusterState.model_validate_json(path.read_text())
        except (OSError, ValidationError, json.JSONDecodeError):
            stale.append(path)
            continue
        if state.namespace != namespace:
            continue  # a namespace that has dots: "a.b" does not belong to "a"
        if is_running(state):
            live.append(state)
        else:
            stale.append(path)
    live.sort(key=lambda s: s.pid_started_at)
    return live, stale


def find_cluster(namespace: str, directory: Path | None = None) -> ClusterState:
    """The one running cluster of ``namespace`` started on this machine; else NoCluster."""
    live, stale = read_states(namespace, directory)
    if len(live) == 1:
        return live[0]
    where = _clusters_dir(directory)
    if len(live) > 1:
        listed = ", ".join(f"pid {s.pid} (redis {s.redis_url})" for s in live)
        raise NoCluster(f"{len(live)} clusters of namespace {namespace!r} run on this machine: "
                        f"{listed}; choose one with --redis-url")
    if stale:
        pids = ", ".join(p.name.split(".")[-2] for p in stale)
        raise NoCluster(f"no cluster of namespace {namespace!r} is running: the `splitserve "
                        f"up` that wrote {where} (pid {pids}) is gone; start one with "
                        f"`splitserve up`, or give --redis-url")
    raise NoCluster(f"no cluster of namespace {namespace!r} is running on this machine (no "
                    f"state file in {where}); start one with `splitserve up`, or give "
                    f"--redis-url")
