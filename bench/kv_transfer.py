"""KV-transfer bandwidth: NIXL between two processes against memcpy, in one run.

    python -m bench.kv_transfer --json out.json --markdown out.md --plot out.png

Two NIXL agents as a prefill and a decode worker have them (nixl 1.5.1, UCX backend, no
progress thread, telemetry on, `UCX_TLS` and thread count as the workers' engines use): the
*prefill* agent runs in a child process and registers a host buffer; the *decode* agent (this
process) registers its own and moves `size` bytes with NIXL READ (what vLLM's decode side does)
and WRITE, for sizes 64 KiB .. 64 MiB, in these patterns:

- `contiguous`: one descriptor (`initialize_xfer`).
- `contiguous-split<N>` (only with `--split-threads N`, a trial): the same bytes as N equal
  descriptors, with the UCX backend running N threads that share out any transfer of N or more
  descriptors (NIXL's thread-pool engine, `split_batch_size` N): the parts are read in parallel.
- `pages-*`: the way vLLM's connector moves KV: each buffer is prepared once as a table of
  `page_kib` pages (`prep_xfer_dlist`, vLLM's one descriptor per block and cache region) and a
  transfer picks pages by index (`make_prepped_xfer`, where NIXL merges neighbouring pages that
  ascend on both sides). Which pages: `ascending` (the same page numbers on both sides, in
  order), `descending` (the same pages listed from the last: the order vLLM's block pool often
  hands a request its blocks in), `descending-ordered` (those pairs as splitserve's connector
  posts them, sorted by local page: services/worker/kv_descriptors.py) and `scattered` (random
  pages on each side: a fragmented block pool, where no order merges anything).

Every READ is checked against the pattern the child wrote, page by page. `descriptors` is what
the transfer listed, `merged_descriptors` what NIXL moved after merging (its telemetry).

Two baselines, in the same process and run:

- **this machine's memcpy bandwidth** (`machine`): a copy between two buffers of
  `4 x the last-level cache` each (at least 64 MiB; STREAM's rule, so that it measures memory,
  not cache), with numpy (`np.copyto`, one thread, as memcpy copies) and torch
  (`Tensor.copy_`, torch's threads), before the first transfer and again after the last; the
  higher of the two measurements counts. `read_ratio_machine` = READ / the one-thread figure.
- **the same bytes, copied the same way** (per point, right after NIXL's): `np.copyto` and
  torch `copy_` of `size` bytes between two buffers of this process. Up to a few MiB both
  buffers stay in the cores' caches, so this is the cache's copy rate, not the machine's
  memory; `read_ratio` = READ / the faster of the two, `read_ratio_1thread` = READ / numpy.

Bandwidths are medians over repetitions (at least `--min-reps`, at least `--min-seconds` per
point), in GB/s (1e9 bytes/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, Field

from bench import json_text

PATTERN_MOD = 251  # byte i of the prefill buffer is i % 251 (a prime: no alignment aliasing)


class KvTransferConfig(BaseModel):
    """What the transfer benchmark measures."""

    min_kib: int = Field(64, ge=4, description="smallest transfer, KiB")
    max_mib: int = Field(64, ge=1, description="largest transfer, MiB")
    page_kib: int = Field(16, ge=0, description=(
        "also move each size as pages of this many KiB from prepared page tables, in every "
        "page order (0: off); the built-in tiny model's KV block is 16 KiB per layer (32 "
        "tokens x 2 KV heads x 32 x float32 x K and V)"))
    min_reps: int = Field(5, ge=1, description="repetitions per point, at least")
    min_seconds: float = Field(0.2, gt=0, description="time per point, at least")
    num_threads: int = Field(1, ge=0, description="UCX worker threads (the workers' default)")
    split_threads: int = Field(0, ge=0, description=(
        "a trial, off at 0: run N UCX threads that share out any transfer of N or more "
        "descriptors (NIXL's split_batch_size N), and add the pattern contiguous-split<N>: "
        "each size as N equal descriptors, read in parallel"))
    machine_mib: int = Field(0, ge=0, description=(
        "buffer size of the machine memcpy baseline, MiB (0: 4 x the last-level cache, at "
        "least 64)"))


class Point(BaseModel):
    """One size and pattern: NIXL READ/WRITE and memcpy bandwidths."""

    bytes: int = Field(description="bytes per transfer")
    pattern: str = Field(description=(
        "contiguous (one descriptor), contiguous-split<N> (N equal descriptors, with "
        "--split-threads N) or pages-<order> (page_kib each, prepared tables)"))
    descriptors: int = Field(description="descriptors the transfer lists")
    merged_descriptors: int = Field(description=(
        "descriptors NIXL moved after merging neighbours (its telemetry)"))
    read_gb_s: float = Field(description="NIXL READ, median GB/s")
    write_gb_s: float = Field(description="NIXL WRITE, median GB/s")
    read_us: float = Field(description="NIXL READ, median microseconds per transfer")
    numpy_gb_s: float = Field(description="np.copyto of the same bytes, median GB/s")
    torch_gb_s: float = Field(description="torch copy_ of the same bytes, median GB/s")
    read_ratio: float = Field(description="READ / max(numpy, torch)")
    write_ratio: float = Field(description="WRITE / max(numpy, torch)")
    read_ratio_1thread: float = Field(description="READ / numpy (both copy on one thread)")
    read_ratio_machine: float = Field(description=(
        "READ / this machine's one-thread memcpy bandwidth (the `machine` baseline)"))


class MachineMemcpy(BaseModel):
    """This machine's memcpy bandwidth: a copy of buffers too large for its caches."""

    buffer_bytes: int = Field(description="bytes per copy (each of the two buffers)")
    last_level_cache_bytes: int = Field(description="the largest CPU cache, as the OS reports")
    numpy_gb_s: float = Field(description="np.copyto (one thread), GB/s: higher of two runs")
    torch_gb_s: float = Field(description="torch copy_ (its threads), GB/s: higher of two runs")
    numpy_runs_gb_s: list[float] = Field(description="np.copyto before and after the transfers")
    torch_runs_gb_s: list[float] = Field(description="torch copy_ before and after")


class KvTransferResult(BaseModel):
    config: KvTransferConfig
    ucx_tls: str = Field(description="UCX transports allowed (as the workers' engines)")
    torch_threads: int = Field(description="torch intra-op threads during the memcpy baseline")
    cpu_count: int
    machine: MachineMemcpy = Field(description="this machine's memcpy bandwidth, same run")
    points: list[Point]


def ucx_env() -> dict[str, str]:
    """The UCX settings of a worker engine's environment (services.worker.environment)."""
    from router.registry import WorkerRole
    from services.worker.config import EngineConfig, WorkerConfig
    from services.worker.environment import engine_environment

    cfg = WorkerConfig(worker_id="kv-bench", role=WorkerRole.DECODE,
                       engine=EngineConfig(model="unused"), redis_url="redis://unused",
                       run_dir=Path("/nonexistent"), cache_dir=Path("/nonexistent"))
    return {k: v for k, v in engine_environment(cfg, 0).items() if k.startswith("UCX_")}


PAGE_ORDERS = ("ascending", "descending", "descending-ordered", "scattered")


def _agent(name: str, num_threads: int, split_threads: int = 0) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    if not split_threads:
        return nixl_agent(name, nixl_agent_config(enable_prog_thread=False,
                                                  num_threads=num_threads, backends=["UCX"],
                                                  capture_telemetry=True))
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[],
                                               capture_telemetry=True))
    # The Python config passes only num_threads; split_batch_size needs the backend's own call.
    agent.create_backend("UCX", {"num_threads": str(split_threads),
                                 "split_batch_size": str(split_threads)})
    return agent


def page_pairs(order: str, count: int, table: int, seed: int = 0
               ) -> tuple[list[int], list[int]]:
    """(local, remote) page numbers of a transfer of `count` pages out of `table`, in the
    order the transfer lists them."""
    from services.worker.kv_descriptors import pair_order

    if order == "ascending":
        ids = list(range(count))
        return ids, ids
    if order in ("descending", "descending-ordered"):
        ids = list(range(count - 1, -1, -1))
        return pair_order(ids, ids) if order == "descending-ordered" else (ids, ids)
    if order == "scattered":
        rng = np.random.default_rng(seed + count)
        return (rng.permutation(table)[:count].tolist(),
                rng.permutation(table)[:count].tolist())
    raise ValueError(f"unknown page order {order!r}")


def _prefill_side(conn: Any, nbytes: int, num_threads: int, split_threads: int) -> None:
    """Child process: the prefill agent, holding the source buffer; serves until told to stop,
    polling notifications (there is no progress thread)."""
    agent = _agent("prefill", num_threads, split_threads)
    buf = (np.arange(nbytes, dtype=np.int64) % PATTERN_MOD).astype(np.uint8)
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    while not conn.poll(0.001):
        agent.get_new_notifs()
    conn.recv()
    conn.close()


def _median_rate(nbytes: int, fn: Callable[[], None], cfg: KvTransferConfig
                 ) -> tuple[float, float]:
    """(median GB/s, median seconds) of `fn` over at least min_reps / min_seconds."""
    fn()  # first touch, connection set-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < cfg.min_reps or time.perf_counter() - start < cfg.min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return nbytes / med / 1e9, med


def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 as sysfs reports it (32 MiB where it says nothing)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best or 32 << 20


def machine_buffer_bytes(cfg: KvTransferConfig, llc: int) -> int:
    """Bytes per buffer of the machine baseline: 4 x the last-level cache, at least 64 MiB."""
    return cfg.machine_mib * 2**20 if cfg.machine_mib else max(4 * llc, 64 << 20)


def sizes(cfg: KvTransferConfig) -> list[int]:
    out, s = [], cfg.min_kib * 1024
    while s <= cfg.max_mib * 2**20:
        out.append(s)
        s *= 2
    return out


def run(cfg: KvTransferConfig, log: Callable[[str], None] = lambda _: None) -> KvTransferResult:
    import torch

    os.environ.update(ucx_env())
    total = cfg.max_mib * 2**20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_side, args=(child, total, cfg.num_threads, cfg.split_threads),
                       daemon=True)
    proc.start()
    measured: list[dict[str, Any]] = []  # each size and pattern, before the machine figure
    try:
        if not parent.poll(120):
            raise RuntimeError("the prefill agent did not start")
        meta, remote_addr = parent.recv()
        agent = _agent("decode", cfg.num_threads, cfg.split_threads)
        local = np.zeros(total, dtype=np.uint8)
        agent.register_memory([(local.ctypes.data, total, 0, "")], "DRAM")
        remote = agent.add_remote_agent(meta)
        expected = (np.arange(total, dtype=np.int64) % PATTERN_MOD).astype(np.uint8)
        src = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
        dst = np.empty_like(src)
        tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
        llc = last_level_cache_bytes()
        big = machine_buffer_bytes(cfg, llc)
        big_src = np.random.default_rng(1).integers(0, 255, big, dtype=np.uint8)
        big_dst = np.empty_like(big_src)
        big_tsrc, big_tdst = torch.from_numpy(big_src), torch.from_numpy(big_dst)
        machine_runs: tuple[list[float], list[float]] = ([], [])

        def measure_machine() -> None:
            machine_runs[0].append(_median_rate(big, lambda: np.copyto(big_dst, big_src), cfg)[0])
            machine_runs[1].append(_median_rate(big, lambda: big_tdst.copy_(big_tsrc), cfg)[0])
            log(f"machine memcpy, 2 x {_size(big)}: numpy {machine_runs[0][-1]:6.2f} "
                f"torch {machine_runs[1][-1]:6.2f} GB/s")

        measure_machine()
        page = cfg.page_kib * 1024
        tables: tuple[Any, Any] | None = None
        if page:
            pages = total // page
            tables = (
                agent.prep_xfer_dlist("NIXL_INIT_AGENT", [
                    (local.ctypes.data + i * page, page, 0) for i in range(pages)], "DRAM"),
                agent.prep_xfer_dlist(remote, [
                    (remote_addr + i * page, page, 0) for i in range(pages)], "DRAM"))

        def wait(op: str, handle: Any) -> None:
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL {op} failed ({state})")

        def contiguous(op: str, n: int, parts: int = 1) -> Any:
            step = n // parts  # initialize_xfer does not merge: the parts stay apart
            return agent.initialize_xfer(
                op, agent.get_xfer_descs([(local.ctypes.data + i * step, step, 0)
                                          for i in range(parts)], "DRAM"),
                agent.get_xfer_descs([(remote_addr + i * step, step, 0)
                                      for i in range(parts)], "DRAM"), remote)

        def merged(handle: Any, listed: int) -> int:
            try:
                return int(agent.get_xfer_telemetry(handle).descCount)
            except Exception:  # telemetry off in this NIXL build: what was listed
                return listed

        def check(n: int, lids: list[int] | None, rids: list[int] | None) -> None:
            if lids is None or rids is None:
                ok = np.array_equal(local[:n], expected[:n])
            else:
                ok = np.array_equal(local.reshape(-1, page)[lids],
                                    expected.reshape(-1, page)[rids])
            if not ok:
                raise RuntimeError(f"NIXL READ of {n} bytes moved the wrong bytes")

        split = cfg.split_threads
        patterns = (["contiguous"] + ([f"contiguous-split{split}"] if split > 1 else [])
                    + ([f"pages-{o}" for o in PAGE_ORDERS] if page else []))
        for n in sizes(cfg):
            np_gb, _ = _median_rate(n, lambda: np.copyto(dst[:n], src[:n]), cfg)
            th_gb, _ = _median_rate(n, lambda: tdst[:n].copy_(tsrc[:n]), cfg)
            best = max(np_gb, th_gb)
            for pattern in patterns:
                lids = rids = None
                if pattern.startswith("contiguous"):
                    listed = split if pattern != "contiguous" else 1
                    handles = {op: contiguous(op, n, listed) for op in ("READ", "WRITE")}
                else:
                    if n < 2 * page:
                        continue
                    assert tables is not None
                    lids, rids = page_pairs(pattern.removeprefix("pages-"), n // page,
                                            total // page)
                    handles = {op: agent.make_prepped_xfer(op, tables[0], lids, tables[1], rids)
                               for op in ("READ", "WRITE")}
                    listed = len(lids)
                local[:] = 0
                wait("READ", handles["READ"])
                check(n, lids, rids)
                read_gb, read_s = _median_rate(n, lambda: wait("READ", handles["READ"]), cfg)
                write_gb, _ = _median_rate(n, lambda: wait("WRITE", handles["WRITE"]), cfg)
                m = dict(bytes=n, pattern=pattern, descriptors=listed,
                         merged_descriptors=merged(handles["READ"], listed),
                         read_gb_s=read_gb, write_gb_s=write_gb, read_us=read_s * 1e6,
                         numpy_gb_s=np_gb, torch_gb_s=th_gb, read_ratio=read_gb / best,
                         write_ratio=write_gb / best, read_ratio_1thread=read_gb / np_gb)
                for h in handles.values():
                    h.release()
                measured.append(m)
                log(f"{_size(n):>8} {pattern:26} {listed:5d}->{m['merged_descriptors']:<5d} "
                    f"READ {read_gb:6.2f} WRITE {write_gb:6.2f} numpy {np_gb:6.2f} "
                    f"torch {th_gb:6.2f} GB/s  READ/memcpy {read_gb / best:.2f}")
        if tables is not None:
            for t in tables:
                t.release()
        agent.remove_remote_agent(remote)
        measure_machine()
        machine = MachineMemcpy(buffer_bytes=big, last_level_cache_bytes=llc,
                                numpy_gb_s=max(machine_runs[0]), torch_gb_s=max(machine_runs[1]),
                                numpy_runs_gb_s=machine_runs[0], torch_runs_gb_s=machine_runs[1])
        # the machine figure is final only after its second measurement, so points come last
        points = [Point(**m, read_ratio_machine=m["read_gb_s"] / machine.numpy_gb_s)
                  for m in measured]
    finally:
        parent.send("stop")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return KvTransferResult(config=cfg, ucx_tls=os.environ.get("UCX_TLS", ""),
                            torch_threads=torch.get_num_threads(),
                            cpu_count=os.cpu_count() or 0, machine=machine, points=points)


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 1024} KiB"


def markdown(res: KvTransferResult) -> str:
    m = res.machine
    rows = [f"This machine's memcpy (2 x {_size(m.buffer_bytes)}, last-level cache "
            f"{_size(m.last_level_cache_bytes)}): numpy (1 thread) {m.numpy_gb_s:.2f} GB/s, "
            f"torch ({res.torch_threads} threads) {m.torch_gb_s:.2f} GB/s.",
            "",
            "| size | pattern | descriptors listed → moved | NIXL READ GB/s | NIXL WRITE GB/s | "
            "READ µs | READ / machine memcpy | same-size numpy memcpy GB/s | same-size torch "
            "memcpy GB/s | READ / same-size numpy | READ / same-size best | "
            "WRITE / same-size best |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res.points:
        rows.append(f"| {_size(p.bytes)} | {p.pattern} | {p.descriptors} → "
                    f"{p.merged_descriptors} | {p.read_gb_s:.2f} | "
                    f"{p.write_gb_s:.2f} | {p.read_us:.0f} | {p.read_ratio_machine:.2f} | "
                    f"{p.numpy_gb_s:.2f} | {p.torch_gb_s:.2f} | {p.read_ratio_1thread:.2f} | "
                    f"{p.read_ratio:.2f} | {p.write_ratio:.2f} |")
    return "\n".join(rows) + "\n"


def plot(res: KvTransferResult, path: Path) -> None:
    """READ bandwidth per pattern against both memcpy baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    patterns = list(dict.fromkeys(p.pattern for p in res.points))
    for i, pattern in enumerate(patterns):
        pts = [p for p in res.points if p.pattern == pattern]
        ax.plot([p.bytes for p in pts], [p.read_gb_s for p in pts],
                "-" if pattern == "contiguous" else "--", marker="o", color=f"C{i}",
                label=f"NIXL READ, {pattern}")
    base = [p for p in res.points if p.pattern == patterns[0]] if patterns else []
    xs = [p.bytes for p in base]
    ax.plot(xs, [p.numpy_gb_s for p in base], ":", marker=".", color="k",
            label="same-size memcpy, numpy (1 thread)")
    ax.plot(xs, [p.torch_gb_s for p in base], ":", marker="x", color="0.5",
            label="same-size memcpy, torch (all threads)")
    ax.axhline(res.machine.numpy_gb_s, color="k", linewidth=1,
               label=f"this machine's memcpy (1 thread, 2 x {_size(res.machine.buffer_bytes)})")
    ax.axhline(res.machine.numpy_gb_s / 2, color="r", linewidth=1, linestyle="--",
               label="half of it (the target)")
    ax.set_xscale("log", base=2)
    xs = sorted({p.bytes for p in res.points})
    ax.set_xticks(xs, [_size(x) for x in xs], rotation=45, fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"KV transfer between two processes (UCX_TLS={res.ucx_tls})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, field in KvTransferConfig.model_fields.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(field.default),
                       default=field.default, help=field.description)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--plot", type=Path, help="write a PNG here")
    ns = p.parse_args(argv)
    try:
        cfg = KvTransferConfig(**{k: getattr(ns, k) for k in KvTransferConfig.model_fields})
    except ValueError as exc:
        print(f"bench.kv_transfer: {exc}", file=sys.stderr)
        return 2
    res = run(cfg, lambda line: print(line, file=sys.stderr, flush=True))
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json_text.dumps(res.model_dump(mode="json")))
    if ns.markdown:
        ns.markdown.write_text(markdown(res))
    if ns.plot:
        plot(res, ns.plot)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
