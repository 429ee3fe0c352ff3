"""vLLM's NixlConnector, as splitserve's workers load it (through `kv_connector_module_path`).

Two changes to the stock connector, both in how it starts:

- **No UCX progress thread unless asked for.** nixl's Python API starts a progress thread with
  `pthrDelay=0` by default: it polls with a zero timeout and keeps one core per engine busy
  forever, mostly in system calls (measured 83-98% of a core per idle prefill or decode engine).
  vLLM offers no option for it. Without the thread, UCX is progressed by the calls vLLM already
  makes on every engine step (transfer status, notifications), which is all a single host or an
  RDMA fabric needs. Measured on 2 CPU cores: idle CPU per engine ~90% -> ~1%, and prefill ->
  decode end-to-end latency about halved. `EngineConfig.nixl_progress_thread` turns it back on
  (kv_connector_extra_config `progress_thread`).
- **The engine keeps the cores it was bound to.** On a CPU platform vLLM's NIXL worker
  "reserves the last core of each NUMA node for KV transfer" with `os.sched_setaffinity(0, ...)`
  while the connector is built — in the engine's main thread, which is also the thread that runs
  the model (OpenMP's master thread). Every disaggregated engine on a host therefore ran its
  model on the host's last core, whatever `VLLM_CPU_OMP_THREADS_BIND` said: on 2 cores the
  prefill and the decode engine shared core 1 and core 0 ran no model at all. The connector now
  puts the thread's affinity back as it was (GPU platforms never take that branch).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

log = logging.getLogger(__name__)

PROGRESS_THREAD_KEY = "progress_thread"
"""kv_connector_extra_config key: run NIXL's UCX progress thread (default false)."""


class SplitserveNixlConnector(NixlConnector):
    """NixlConnector that leaves the engine thread's CPU binding alone and, unless configured
    otherwise, runs its NIXL agent without a progress thread."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
        progress_thread = bool(extra.get(PROGRESS_THREAD_KEY, False))
        make_config = base_worker.nixl_agent_config
        if make_config is not None and not progress_thread:
            # base_worker looks the name up when it builds the agent: swap it for this call only.
            base_worker.nixl_agent_config = functools.partial(make_config,
                                                              enable_prog_thread=False)
        affinity = _thread_affinity()
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        finally:
            base_worker.nixl_agent_config = make_config
            _restore_thread_affinity(affinity)


def _thread_affinity() -> set[int] | None:
    """The calling thread's CPU affinity, where the platform has one."""
    getter = getattr(os, "sched_getaffinity", None)
    return set(getter(0)) if getter is not None else None


def _restore_thread_affinity(affinity: set[int] | None) -> None:
    """Put the calling thread's CPU affinity back to `affinity` if something changed it."""
    if affinity is None:
        return
    now = set(os.sched_getaffinity(0))
    if now != affinity:
        os.sched_setaffinity(0, affinity)
        log.info("NIXL connector start moved the engine thread to cores %s; restored %s",
                 sorted(now), sorted(affinity))
