"""How splitserve's NIXL connector orders a KV read's block descriptors
(services/worker/kv_descriptors.py; real transfers: tests/integration/test_bench_kv_transfer.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.worker.kv_descriptors import Indices, ordered_prepped_xfer, pair_order


def contiguous_runs(local: Indices, remote: Indices) -> int:  # NIXL's merge rule, as a model
    """How many descriptors NIXL's merge leaves for these pairs in this order: a pair
    continues the run before it when both indices are one more than the previous pair's
    (neighbouring blocks of one prepared region are neighbours in memory)."""
    if len(local) == 0:
        return 0
    loc, rem = np.asarray(local, dtype=np.int64), np.asarray(remote, dtype=np.int64)
    continues = (np.diff(loc) == 1) & (np.diff(rem) == 1)
    return int(len(loc) - continues.sum())


def pairs(local, remote) -> set[tuple[int, int]]:
    return set(zip(np.asarray(local).tolist(), np.asarray(remote).tolist()))


def test_descending_runs_on_both_sides_become_one_ascending_run() -> None:
    # vLLM's block pool hands out a freed request's blocks in reverse: 9, 8, 7, 6 here and
    # 23, 22, 21, 20 on the other engine.
    local, remote = [9, 8, 7, 6], [23, 22, 21, 20]
    assert contiguous_runs(local, remote) == 4
    ordered = pair_order(local, remote)
    assert ordered == ([6, 7, 8, 9], [20, 21, 22, 23])
    assert contiguous_runs(*ordered) == 1
    assert pairs(*ordered) == pairs(local, remote)  # the same bytes to the same places


def test_every_region_of_a_read_merges_separately() -> None:
    # Two cache regions (layers) of 100 blocks each: desc id = region * 100 + block.
    blocks_local, blocks_remote = [41, 40, 39], [7, 6, 5]
    local = [r * 100 + b for r in range(2) for b in blocks_local]
    remote = [r * 100 + b for r in range(2) for b in blocks_remote]
    assert contiguous_runs(local, remote) == 6
    assert contiguous_runs(*pair_order(local, remote)) == 2


def test_ascending_runs_stay_merged_and_mixed_directions_stay_apart() -> None:
    assert contiguous_runs(*pair_order([1, 2, 3], [5, 6, 7])) == 1
    # local ascends while remote descends: no order merges them, none is lost either
    local, remote = [1, 2, 3], [7, 6, 5]
    out = pair_order(local, remote)
    assert contiguous_runs(*out) == 3 and pairs(*out) == pairs(local, remote)


def test_ordering_never_leaves_more_descriptors() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        local = rng.permutation(64)[:n]
        remote = rng.permutation(64)[:n]
        if rng.random() < 0.5:  # runs that are neighbours on both sides, in some direction
            start_l, start_r = int(rng.integers(0, 20)), int(rng.integers(0, 20))
            step = int(rng.choice([-1, 1]))
            local = np.arange(n) * step + start_l + (n if step < 0 else 0)
            remote = np.arange(n) * step + start_r + (n if step < 0 else 0)
        out = pair_order(local, remote)
        assert pairs(*out) == pairs(local, remote)
        assert contiguous_runs(*out) <= contiguous_runs(local, remote)


def test_types_are_kept_as_vllm_passes_them() -> None:
    local = np.array([3, 2, 1], dtype=np.int32)
    remote = np.array([13, 12, 11], dtype=np.int32)
    out_l, out_r = pair_order(local, remote)
    assert out_l.dtype == np.int32 and out_r.dtype == np.int32
    assert out_l.tolist() == [1, 2, 3] and out_r.tolist() == [11, 12, 13]
    out_l, out_r = pair_order([2, 1], [5, 4])
    assert out_l == [1, 2] and out_r == [4, 5]
    assert all(type(x) is int for x in out_l + out_r)
    assert pair_order([], []) == ([], [])
    with pytest.raises(ValueError, match="2 local and 1 remote"):
        pair_order([1, 2], [1])


def test_the_wrapped_agent_call_gets_ordered_pairs_and_everything_else_unchanged() -> None:
    calls = []

    def make_prepped_xfer(op, local_side, local, remote_side, remote, notif_msg=b"",
                          backends=()):
        calls.append((op, local_side, local, remote_side, remote, notif_msg, backends))
        return "handle"

    wrapped = ordered_prepped_xfer(make_prepped_xfer)
    assert wrapped("READ", "L", [5, 4], "R", [9, 8], notif_msg=b"req:1") == "handle"
    assert calls == [("READ", "L", [4, 5], "R", [8, 9], b"req:1", ())]
