"""The gateway's ledger of its own dispatches: fresh load now, and its part of a worker's
published snapshot."""

from __future__ import annotations

from router.dispatch_ledger import DispatchLedger, OwnLoad


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pending_then_decoding_then_gone() -> None:
    clock = Clock()
    ledger = DispatchLedger(clock=clock)
    ledger.sent("r1", "p0", prompt_tokens=1000, uncached_tokens=300, prefills=True)
    ledger.sent("r1", "d0", prompt_tokens=1000, uncached_tokens=300, prefills=False)
    clock.t = 101.0
    v = ledger.view({"p0": 200.0, "d0": 200.0})
    assert v["p0"] == OwnLoad(pending_reqs=1, pending_uncached_tokens=300,
                              snapshot_pending_reqs=1, snapshot_pending_prompt_tokens=1000)
    # the decode worker receives the KV: pending there, but no prompt work and not in its
    # published pending prefill figures
    assert v["d0"].pending_reqs == 1 and v["d0"].pending_uncached_tokens == 0
    assert v["d0"].snapshot_pending_prompt_tokens == 0
    ledger.finished("r1", "p0")  # prefill done
    clock.t = 102.0
    ledger.first_token("r1", "d0")
    v = ledger.view({"p0": 200.0, "d0": 200.0})
    assert v["p0"] == OwnLoad()
    assert v["d0"].decoding_reqs == 1 and v["d0"].snapshot_decoding_reqs == 1
    ledger.finished("r1")
    assert ledger.view({"d0": 200.0})["d0"] == OwnLoad()


def test_snapshot_sees_what_was_pending_at_its_time() -> None:
    clock = Clock()
    ledger = DispatchLedger(clock=clock)
    ledger.sent("old", "b0", 800, 800, True)           # at 100
    clock.t = 100.5
    ledger.first_token("old", "b0")                     # first token at 100.5
    clock.t = 101.0
    ledger.sent("new", "b0", 600, 100, True)            # at 101, after the snapshot at 100.7
    v = ledger.view({"b0": 100.7})["b0"]
    # at 100.7 "old" was decoding and "new" not sent: the snapshot holds none of ours pending
    assert v.snapshot_pending_prompt_tokens == 0 and v.snapshot_decoding_reqs == 1
    # now: "new" pending with its predicted 100 uncached tokens, "old" decoding
    assert (v.pending_reqs, v.pending_uncached_tokens, v.decoding_reqs) == (1, 100, 1)
    v = ledger.view({"b0": 100.2})["b0"]  # an older snapshot: "old" was still prefilling
    assert v.snapshot_pending_prompt_tokens == 800 and v.snapshot_decoding_reqs == 0


def test_ended_requests_are_forgotten_once_no_snapshot_can_hold_them() -> None:
    clock = Clock()
    ledger = DispatchLedger(history_s=3.0, clock=clock)
    for i in range(100):
        ledger.sent(f"r{i}", "b0", 10, 10, True)
        ledger.finished(f"r{i}")
    assert len(ledger._closed) == 100
    clock.t = 101.0
    ledger.view({"b0": 100.5})  # every snapshot is later than their end
    assert len(ledger._closed) == 0


def test_pending_prefixes_are_the_prompts_being_computed_until_they_end() -> None:
    """A prompt sent to a worker is known there before its engine publishes its blocks: a
    later prompt sharing its first blocks is told so, for the worker that computes it (not the
    one that receives the KV), until the request ends."""
    ledger = DispatchLedger(clock=Clock())
    system = [11, 12, 13]  # the shared system prompt's blocks
    ledger.sent("a", "p0", 130, 130, True, blocks=[*system, 14])
    ledger.sent("a", "d0", 130, 130, False, blocks=[*system, 14])  # receives the KV
    ledger.sent("b", "p1", 100, 100, True, blocks=[21, 22, 23])
    assert ledger.pending_prefixes([*system, 99], ["p0", "p1", "d0"]) == {"p0": 3}
    assert ledger.pending_prefixes([*system, 14, 15], ["p0"]) == {"p0": 4}
    ledger.sent("c", "p0", 100, 4, True, blocks=[*system])  # a second holder of it
    ledger.finished("a", "p0")                              # a's prefill is done
    assert ledger.pending_prefixes([*system, 14], ["p0"]) == {"p0": 3}
    ledger.finished("c")
    ledger.finished("b")
    assert ledger.pending_prefixes([*system, 14], ["p0", "p1"]) == {}
    assert ledger.pending_prefixes([21, 22], ["p1"]) == {}


def test_a_prompt_starting_with_a_block_another_holds_later_is_told() -> None:
    """Block hashes chain, so a prompt's first block is some other prompt's later block only
    by a collision; the ledger still answers as the union of each worker's pending blocks."""
    ledger = DispatchLedger(clock=Clock())
    ledger.sent("a", "p0", 64, 64, True, blocks=[1, 2, 3, 4])
    ledger.sent("b", "p1", 64, 64, True, blocks=[3, 7])
    assert ledger.pending_prefixes([3, 4, 9], {"p0", "p1"}) == {"p0": 2, "p1": 1}
    assert ledger.pending_prefixes([2, 3, 7], ["p0"]) == {"p0": 2}
    ledger.finished("a")
    assert ledger.pending_prefixes([3, 4], {"p0", "p1"}) == {"p1": 1}
    ledger.finished("b")
    assert ledger.pending_prefixes([3, 7], {"p0", "p1"}) == {}
    assert not ledger._pending and not ledger._first and not ledger._union


def test_a_worker_viewed_again_unchanged_is_its_last_view_and_any_change_is_seen() -> None:
    """`view` keeps each worker's last answer while its entries and snapshot time stay: a
    twin ledger whose kept views are dropped before every view answers the same through a
    seeded run of dispatches, first tokens, ends and heartbeats."""
    import random

    rng = random.Random(21)
    clocks = [Clock(), Clock()]
    kept, fresh = (DispatchLedger(history_s=0.5, clock=c) for c in clocks)
    workers = [f"w{i}" for i in range(6)]
    snaps = {w: 100.0 for w in workers}
    open_: list[tuple[str, str]] = []
    for i in range(3000):
        step = rng.choice([0.0, 0.0, 0.01])
        for c in clocks:
            c.t += step
        op = rng.random()
        if op < 0.3:
            w, uncached = rng.choice(workers), rng.randrange(100)
            for ledger in (kept, fresh):
                ledger.sent(f"r{i}", w, 100, uncached, True)
            open_.append((f"r{i}", w))
        elif op < 0.45 and open_:
            rid, w = rng.choice(open_)
            for ledger in (kept, fresh):
                ledger.first_token(rid, w)
        elif op < 0.6 and open_:
            rid, _ = open_.pop(rng.randrange(len(open_)))
            for ledger in (kept, fresh):
                ledger.finished(rid)
        elif op < 0.7:  # a heartbeat: a worker's snapshot moves
            snaps[rng.choice(workers)] = clocks[0].t - rng.random() * 0.2
        asked = {w: snaps[w] for w in rng.sample(workers, rng.randint(1, 6))}
        fresh._views.clear()
        assert kept.view(asked) == fresh.view(asked)
    assert kept._views and any(v.pending_reqs for v in kept.view(snaps).values())
