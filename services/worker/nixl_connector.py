"""vLLM's NixlConnector, as splitserve's workers load it (through `kv_connector_module_path`).

Three changes to the stock connector: two in how it starts, one in how it reads KV.

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
  puts the thread's affinity back as it was (GPU platforms never take that branch). The cores
  vLLM picks are also limited to those the process may use: taken from the host's topology,
  they can lie outside a container's cpuset, and `sched_setaffinity` then fails and the engine
  does not start (vllm#58033; e.g. Kubernetes' static CPU manager).
- **KV reads list their blocks so NIXL can merge them.** A read names (local, remote) block
  descriptor pairs; NIXL merges neighbours only where both sides ascend, and vLLM often hands a
  request blocks in descending order. The agent's `make_prepped_xfer` gets the same pairs
  sorted by local block (services/worker/kv_descriptors.py has why and how);
  `EngineConfig.nixl_ordered_descriptors` (kv_connector_extra_config `ordered_descriptors`)
  turns it off.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

from services.worker.config import NIXL_ORDERED_DESCRIPTORS_KEY, NIXL_PROGRESS_THREAD_KEY
from services.worker.cpu_affinity import (restore_thread_affinity, thread_affinity,
                                          usable_numa_cores)
from services.worker.kv_descriptors import ordered_prepped_xfer


class SplitserveNixlConnector(NixlConnector):
    """NixlConnector that leaves the engine thread's CPU binding alone and, unless configured
    otherwise, runs its NIXL agent without a progress thread and orders its reads' block
    descriptors for merging."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
        progress_thread = bool(extra.get(NIXL_PROGRESS_THREAD_KEY, False))
        make_config = base_worker.nixl_agent_config
        if make_config is not None and not progress_thread:
            # base_worker looks the name up when it builds the agent: swap it for this call only.
            base_worker.nixl_agent_config = functools.partial(make_config,
                                                              enable_prog_thread=False)
        affinity = thread_affinity()
        platform = base_worker.current_platform
        discover = getattr(platform, "discover_numa_topology", None)
        if discover is not None and affinity is not None:
            # An instance attribute shadows the platform's classmethod for this call only.
            platform.discover_numa_topology = lambda: usable_numa_cores(discover(), affinity)
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        finally:
            base_worker.nixl_agent_config = make_config
            if discover is not None and affinity is not None:
                del platform.discover_numa_topology
            restore_thread_affinity(affinity)
        agent = getattr(self.connector_worker, "nixl_wrapper", None)
        if agent is not None and bool(extra.get(NIXL_ORDERED_DESCRIPTORS_KEY, True)):
            # An instance attribute shadows the agent's method for every read this engine posts.
            agent.make_prepped_xfer = ordered_prepped_xfer(agent.make_prepped_xfer)
