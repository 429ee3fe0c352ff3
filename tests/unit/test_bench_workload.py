"""Benchmark workloads: seeded, byte-identical across builds, shaped as each scenario says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.workload import (SCENARIOS, BenchRequest, PrefixReuseConfig, SyntheticConfig,
                            build_workload, scenario_config)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_same_seed_same_requests_different_seed_different() -> None:
    for name in SCENARIOS:
        a, b = build_workload(name, seed=7), build_workload(name, seed=7)
        assert a.requests == b.requests
        assert a.fingerprint() == b.fingerprint()
        assert build_workload(name, seed=8).fingerprint() != a.fingerprint()


def test_fingerprint_does_not_depend_on_hash_seed() -> None:
    code = ("from bench.workload import build_workload as b;"
            "print(b('prefix-reuse', seed=3).fingerprint(), b('synthetic', seed=3).fingerprint())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).resolve().parents[2],
                           env={"PYTHONHASHSEED": h, "PATH": ""}).stdout
            for h in ("0", "1", "12345")}
    assert len(outs) == 1


def test_prefix_reuse_shape() -> None:
    cfg = PrefixReuseConfig(conversations=5, turns=3, system_prompts=2, seed=1)
    w = cfg.build()
    reqs = w.requests
    assert len(reqs) == 15 and w.conversations == 5
    assert [r.index for r in reqs] == list(range(15))
    # interleaved arrivals: turn-major, round-robin over conversations
    assert [(r.turn, r.conversation) for r in reqs] == [(t, c) for t in range(3)
                                                        for c in range(5)]
    by = {(r.conversation, r.turn): r for r in reqs}
    for (c, t), r in by.items():
        assert r.api == "chat" and r.max_tokens == cfg.osl
        roles = [m[0] for m in r.messages]
        assert roles == ["system"] + ["user", "assistant"] * t + ["user"]
        # the system prompt is shared by conversations c and c+2, distinct from c+1's
        assert r.messages[0][1] == cfg.system_prompt(c % 2)
        if t == 0:
            assert r.after is None
        else:
            prev = by[(c, t - 1)]
            assert r.after == prev.index
            # a turn's messages extend the previous turn's exactly
            assert r.messages[:len(prev.messages)] == prev.messages
            assert len(r.messages) == len(prev.messages) + 2
    s0, s1 = cfg.system_prompt(0), cfg.system_prompt(1)
    assert s0 != s1 and common_prefix(s0, s1) < 30
    for s in (s0, s1):
        assert cfg.system_min_words <= len(s.split()) - 5 <= cfg.system_max_words


def test_system_prompts_span_several_kv_blocks() -> None:
    """Long enough to cover several 32-token blocks (≥ 300 words ≈ ≥ 300 tokens)."""
    cfg = PrefixReuseConfig()
    assert cfg.system_min_words >= 300
    assert all(len(cfg.system_prompt(k).split()) >= 300 for k in range(cfg.system_prompts))


def test_more_conversations_do_not_change_existing_ones() -> None:
    small = PrefixReuseConfig(conversations=2, turns=2).build()
    big = PrefixReuseConfig(conversations=4, turns=2).build()
    msgs = {(r.conversation, r.turn): r.messages for r in big.requests}
    for r in small.requests:
        assert msgs[(r.conversation, r.turn)] == r.messages


def test_synthetic_lengths_and_apis() -> None:
    cfg = SyntheticConfig(requests=50, isl=100, isl_spread=20, osl=9, seed=4)
    w = cfg.build()
    assert len(w.requests) == 50
    lens = [len(r.prompt.split()) for r in w.requests]
    assert all(80 <= n <= 120 for n in lens) and len(set(lens)) > 5
    assert all(r.api == "completions" and r.max_tokens == 9 and r.after is None
               for r in w.requests)
    assert len({r.prompt for r in w.requests}) == 50
    chat = SyntheticConfig(requests=3, api="chat").build()
    assert all(r.api == "chat" and r.messages[0][0] == "user" for r in chat.requests)
    body = chat.requests[0].payload()
    assert body["messages"][0]["role"] == "user" and body["max_tokens"] == 32


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario_config("nope", {})
    with pytest.raises(ValueError, match="no parameter"):
        scenario_config("synthetic", {"turns": 2})
    with pytest.raises(ValueError):
        scenario_config("synthetic", {"isl": 10, "isl_spread": 10})
    with pytest.raises(ValueError):
        scenario_config("prefix-reuse", {"system_min_words": 9, "system_max_words": 8})
    with pytest.raises(ValueError):
        BenchRequest(0, 4)
    assert scenario_config("prefix-reuse", {"turns": "2"}).turns == 2  # CLI strings coerce
