"""The engine environment derived from a worker's config."""

from __future__ import annotations

from pathlib import Path

from router.registry import WorkerRole
from services.worker.config import EngineConfig, WorkerConfig
from services.worker.environment import engine_environment


def cfg(tmp_path: Path, device: str = "cpu", model: str | None = None) -> WorkerConfig:
    return WorkerConfig(worker_id="w", role=WorkerRole.PREFILL,
                        engine=EngineConfig(model=model or str(tmp_path), device=device,
                                            cpu_kv_cache_space_gib=2, hash_seed="7"),
                        redis_url="redis://x", run_dir=tmp_path / "run",
                        cache_dir=tmp_path / "cache", cpu_threads_bind="1")


def test_cpu_environment(tmp_path: Path) -> None:
    env = engine_environment(cfg(tmp_path), 5601)
    assert env["PYTHONHASHSEED"] == "7"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"  # a local model never reaches out to a hub
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
        assert env[key].startswith(str(tmp_path))


def test_cuda_environment_has_no_cpu_knobs(tmp_path: Path) -> None:
    env = engine_environment(cfg(tmp_path, device="cuda", model="org/some-model"), 5601)
    assert not any(k.startswith("VLLM_CPU_") for k in env)
    assert "HF_HUB_OFFLINE" not in env  # a hub id may be downloaded on GPU nodes


def test_the_side_channel_port_is_outside_the_ephemeral_range() -> None:
    """vLLM binds the NIXL side channel long after the worker picks its port: a port from the
    kernel's ephemeral range may be taken by any connection meanwhile."""
    import socket

    from services.ports import ephemeral_port_low, port_outside_ephemeral_range

    low = ephemeral_port_low()
    ports = {port_outside_ephemeral_range() for _ in range(20)}
    if low > 20001:  # (a kernel whose ephemeral range starts lower: any free port is taken)
        assert all(20000 <= p < low for p in ports), (ports, low)
    for p in list(ports)[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free
