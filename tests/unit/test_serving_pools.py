"""services/gateway/serving_pools.py and in_flight.py: what a routing decision reads of the
worker directory, arranged once per registry snapshot, and the in-flight counts telling the
shortlist which workers' loads moved."""

from __future__ import annotations

import gc

from redis.asyncio import Redis

from router.registry import WorkerInfo, WorkerRole, WorkerState
from services.gateway.in_flight import InFlightCounts
from services.gateway.serving_pools import ServingPools, Without
from services.gateway.worker_directory import WorkerDirectory
from tests.support.cluster import TEST_SECRET


def info(wid: str, role: WorkerRole, *, seed: str = "0",
         state: WorkerState = WorkerState.SERVING) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address="127.0.0.1:1", model="m",
                      hash_seed=seed, state=state)


def test_pools_are_arranged_once_per_snapshot() -> None:
    d = WorkerDirectory(Redis(port=1), "ns", "m", TEST_SECRET)  # never connects
    d.take([info("p0", WorkerRole.PREFILL), info("d0", WorkerRole.DECODE),
             info("p1", WorkerRole.PREFILL, seed="1"), info("b0", WorkerRole.BOTH),
             info("d1", WorkerRole.DECODE, state=WorkerState.DRAINING),
             info("d2", WorkerRole.DECODE)])
    pools = d.pools()
    assert d.pools() is pools  # the same snapshot: not arranged again
    assert [w.worker_id for w in pools.prefill] == ["p0", "p1"]
    # decode workers serve: the `both` one is not a decode candidate; draining ones are not
    assert [w.worker_id for w in pools.decode] == ["d0", "d2"]
    assert pools.schemes == {(16, "sha256", "0"): ("p0", "d0", "d2"),
                             (16, "sha256", "1"): ("p1",)}
    assert pools.eligible[(16, "sha256", "0")] == {"p0", "d0", "d2"}
    assert pools.decode.role == WorkerRole.DECODE
    d.take([info("b0", WorkerRole.BOTH), info("b1", WorkerRole.BOTH)])
    assert d.pools() is not pools
    assert [w.worker_id for w in d.pools().decode] == ["b0", "b1"] and not d.pools().prefill


def test_a_retry_excludes_without_copying_an_untouched_pool() -> None:
    pool = ServingPools([info(f"d{i}", WorkerRole.DECODE) for i in range(6)]).decode
    assert pool.without(frozenset()) is pool.workers
    assert pool.without(frozenset({"elsewhere"})) is pool.workers
    assert pool.excluded(frozenset({"d1", "d4", "elsewhere"})) == 2
    assert [w.worker_id for w in pool.without(frozenset({"d1", "d4"}))] == ["d0", "d2", "d3",
                                                                            "d5"]
    assert pool.first(frozenset({"d0", "d1"})).worker_id == "d2"  # type: ignore[union-attr]
    assert [w.worker_id for w in pool.in_order(["d5", "zz", "d0", "d3"])] == ["d0", "d3", "d5"]
    eligible = Without(frozenset({"d0", "d1"}), frozenset({"d1"}))
    assert "d0" in eligible and "d1" not in eligible and "d2" not in eligible


def test_in_flight_counts_tell_each_watcher_who_moved() -> None:
    counts = InFlightCounts()
    a, b = counts.watch(), counts.watch()
    counts["w1"] += 1
    counts["w2"] += 2
    a.clear()
    counts["w2"] -= 1
    del counts["w1"]
    assert a == {"w1", "w2"} and b == {"w1", "w2"} and counts == {"w2": 1}
    assert counts["never"] == 0 and "never" not in a  # reading moves nothing
    counts.clear()  # not key by key: every worker may have moved
    assert a.all_moved and b.all_moved
    del b
    gc.collect()
    counts["w3"] += 1  # the dropped watcher is forgotten
    assert a == {"w1", "w2", "w3"} and len([r for r in counts._watchers if r()]) == 1


def test_a_snapshot_that_changed_only_loads_reuses_the_arrangement() -> None:
    ws = [info(f"d{i}", WorkerRole.DECODE) for i in range(5)]
    first = ServingPools.of(ws)
    busy = ws[2].model_copy(update={"load": ws[2].load.model_copy(update={"in_flight": 3})})
    after = [*ws[:2], busy, *ws[3:]]
    pools = ServingPools.of(after, first)
    assert pools.changes == {"d2": busy} and pools.after is ws
    assert pools.decode.workers[2] is busy and pools.decode.position is first.decode.position
    assert pools.schemes is first.schemes
    # a worker draining (or gone, or new) changes the pools: arranged anew
    draining = ws[1].model_copy(update={"state": WorkerState.DRAINING})
    again = ServingPools.of([ws[0], draining, *ws[2:]], pools)
    assert again.changes is None and [w.worker_id for w in again.decode] == ["d0", "d2", "d3",
                                                                             "d4"]
    assert ServingPools.of(ws[:4], pools).changes is None


def test_a_snapshot_without_any_worker_is_held_off_for_a_while(monkeypatch) -> None:
    """Every worker gone at once (a Redis that restarted empty, until the workers' next
    heartbeats): the last snapshot stays for EMPTIED_GRACE_S, so nothing in flight is moved
    off live workers; past it, or after a snapshot with no serving worker, it is taken."""
    from services.gateway import worker_directory as wd

    d = WorkerDirectory(Redis(port=1), "ns", "m", TEST_SECRET)  # never connects
    d.take([info("d0", WorkerRole.DECODE), info("p0", WorkerRole.PREFILL)])
    d.take([])
    assert [w.worker_id for w in d.workers] == ["d0", "p0"]
    d.take([info("d0", WorkerRole.DECODE)])  # one of them left: taken
    assert [w.worker_id for w in d.workers] == ["d0"]
    now = wd.time.monotonic()
    monkeypatch.setattr(wd.time, "monotonic", lambda: now + wd.EMPTIED_GRACE_S + 1)
    d.take([])
    assert d.workers == []
    d.take([info("d1", WorkerRole.DECODE, state=WorkerState.DRAINING)])
    d.take([])  # none served: nothing to hold on to
    assert d.workers == []
