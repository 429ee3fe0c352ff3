"""router.shortlist: the candidates a decision scores."""

from __future__ import annotations

import random

from router.prefix_depths import PrefixDepths
from router.shortlist import LoadOrder, shortlist


def _order(loads: dict[str, float]) -> LoadOrder:
    o = LoadOrder()
    for w, x in loads.items():
        o.set(w, x)
    return o


def test_load_order_follows_changes() -> None:
    o = _order({"a": 3, "b": 1, "c": 2})
    assert list(o.ascending()) == ["b", "c", "a"]
    o.set("b", 5)
    o.set("c", 2)  # unchanged
    assert list(o.ascending()) == ["c", "a", "b"] and o.load("b") == 5
    o.discard("a")
    o.discard("zz")
    assert list(o.ascending()) == ["c", "b"] and "a" not in o and len(o) == 2
    o.set("d", 2)  # ties by id
    assert list(o.ascending()) == ["c", "d", "b"]


def test_holders_first_then_the_least_loaded() -> None:
    loads = {f"w{i}": float(i) for i in range(100)}
    o = _order(loads)
    got = shortlist({"w50": 10, "w60": 3, "w70": 0}, o, holders=8, least_loaded=2)
    assert got == ["w50", "w60", "w0", "w1"]  # w70 holds nothing: not a holder
    # holders that are also among the least loaded are not taken twice
    assert shortlist({"w0": 4}, o, holders=8, least_loaded=2) == ["w0", "w1", "w2"]
    # workers not in the pool are never taken
    assert shortlist({"gone": 64}, o, holders=8, least_loaded=1) == ["w0"]


def test_many_holders_keep_the_longest_and_among_ties_the_least_loaded() -> None:
    o = _order({f"w{i}": float(100 - i) for i in range(100)})  # w99 is the least loaded
    cached = {f"w{i}": 4 for i in range(60)}  # a system prompt on 60 workers
    cached.update({"w10": 30, "w20": 9})
    got = shortlist(cached, o, holders=5, least_loaded=2)
    assert got[:2] == ["w10", "w20"]
    assert set(got[2:5]) == {"w59", "w58", "w57"}  # tied at 4: the least loaded of them
    assert got[5:] == ["w99", "w98"]
    assert len(shortlist(cached, o, holders=8, least_loaded=4)) == 12


def _depths(cached: dict[str, int]) -> PrefixDepths:
    out = PrefixDepths()
    for n in sorted(set(cached.values()), reverse=True):
        out.add_level(n, [w for w, d in cached.items() if d == n])
    return out


def test_a_lookups_levels_give_what_the_plain_mapping_gives() -> None:
    rng = random.Random(5)
    for _ in range(300):
        pool = rng.randrange(1, 200)
        o = _order({f"w{i}": float(rng.randrange(6)) for i in range(pool)})
        held = rng.sample(range(pool + 20), rng.randrange(0, pool + 1))  # some not in the pool
        cached = {f"w{i}": rng.choice([1, 2, 2, 4, 4, 4, 9]) for i in held}
        holders, least = rng.randrange(0, 8), rng.randrange(0, 4)
        plain = shortlist(cached, o, holders=holders, least_loaded=least)
        levels = shortlist(_depths(cached), o, holders=holders, least_loaded=least)
        assert set(levels) == set(plain), (cached, holders, least)
        depth = [cached.get(w, 0) for w in levels]
        assert depth[:len(depth) - least] == sorted(depth[:len(depth) - least], reverse=True)
    changed = _depths({"a": 3, "b": 1})
    changed["c"] = 5  # changed after the lookup: read as a plain mapping
    assert not changed.levels_valid
    assert shortlist(changed, _order({"a": 0, "b": 0, "c": 0}), holders=1, least_loaded=0) == ["c"]


def test_a_prefix_raised_in_place_keeps_the_levels_a_fresh_lookup_would_have() -> None:
    rng = random.Random(11)
    for _ in range(200):
        depths = {f"w{i}": rng.randint(1, 8) for i in rng.sample(range(30), rng.randint(0, 12))}
        raised = {f"w{rng.randrange(30)}": rng.randint(1, 10) for _ in range(rng.randint(1, 6))}
        got = _depths(depths)
        got.raise_all(raised)
        want = {**depths, **{w: max(depths.get(w, 0), n) for w, n in raised.items()}}
        assert dict(got) == want and got.levels_valid
        fresh = _depths(want)
        assert [(b, sorted(ws)) for b, ws in got.levels] == \
            [(b, sorted(ws)) for b, ws in fresh.levels]
        o = _order({f"w{i}": float(rng.randrange(4)) for i in range(30)})
        assert set(shortlist(got, o, holders=4)) == set(shortlist(want, o, holders=4))


def _depths(depths: dict[str, int]) -> PrefixDepths:
    out = PrefixDepths()
    for b in sorted(set(depths.values()), reverse=True):
        out.add_level(b, sorted(w for w, d in depths.items() if d == b))
    return out
