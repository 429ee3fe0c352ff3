"""The mixed scenario, the synthetic OSL spread, and workload fingerprints that stay put when
request fields are added."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bench.workload import MixedConfig, SyntheticConfig, build_workload

REPO = Path(__file__).resolve().parents[2]


def test_mixed_shape() -> None:
    cfg = MixedConfig(chat_requests=40, chat_rate=8.0, long_requests=5, seed=2)
    w = cfg.build()
    assert w.scenario == "mixed" and w.tags == ["chat", "long"]
    chats = [r for r in w.requests if r.tag == "chat"]
    longs = [r for r in w.requests if r.tag == "long"]
    assert len(chats) == 40 and len(longs) == 5
    arrivals = [r.arrival_s for r in w.requests]
    assert all(a is not None for a in arrivals) and arrivals == sorted(arrivals)
    assert [r.index for r in w.requests] == list(range(45))
    span = 40 / 8.0
    # long prompts evenly spread over the chat stream, the first half a gap in
    gap = span / 5
    assert [r.arrival_s for r in longs] == pytest.approx([(j + 0.5) * gap for j in range(5)])
    # the chat stream is a Poisson process of the given rate: mean gap near 1/rate
    chat_at = [r.arrival_s for r in chats]
    mean_gap = (chat_at[-1] - chat_at[0]) / 39
    assert 0.5 / 8.0 < mean_gap < 2.0 / 8.0
    words = lambda r: len(r.messages[0][1].split())  # noqa: E731
    assert all(36 <= words(r) <= 60 for r in chats)
    assert all(665 <= words(r) <= 735 for r in longs)
    assert {r.max_tokens for r in chats} == {64} and {r.max_tokens for r in longs} == {8}
    assert all(r.api == "chat" and r.after is None for r in w.requests)
    assert MixedConfig(seed=2, chat_requests=40, chat_rate=8.0, long_requests=5).build() == w
    assert build_workload("mixed", seed=3).fingerprint() != build_workload(
        "mixed", seed=2).fingerprint()


def test_mixed_without_long_prompts_and_bad_values() -> None:
    w = MixedConfig(chat_requests=3, long_requests=0).build()
    assert w.tags == ["chat"]
    with pytest.raises(ValueError):
        MixedConfig(chat_rate=0)
    with pytest.raises(ValueError):
        MixedConfig(chat_requests=0)


def test_synthetic_osl_spread() -> None:
    w = SyntheticConfig(requests=200, osl=64, osl_spread=16, seed=1).build()
    lens = [r.max_tokens for r in w.requests]
    assert min(lens) >= 48 and max(lens) <= 80 and len(set(lens)) > 10
    assert SyntheticConfig(requests=5, osl=64).build().requests[0].max_tokens == 64
    with pytest.raises(ValueError):
        SyntheticConfig(osl=8, osl_spread=8)


def _committed_workload_module(tmp_path: Path):
    """bench/workload.py as of the commit that introduced fingerprints (before arrival/tag)."""
    src = subprocess.run(["git", "show", "b0c55dd:bench/workload.py"], cwd=REPO,
                         capture_output=True, text=True)
    if src.returncode != 0:
        pytest.skip("the repository history is not available")
    path = tmp_path / "old_workload.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("old_workload", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_workload"] = mod  # dataclasses look their module up while decorating
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["old_workload"]
    return mod


def test_fingerprints_of_existing_scenarios_unchanged(tmp_path: Path) -> None:
    old = _committed_workload_module(tmp_path)
    for name, params in (("prefix-reuse", {"seed": 1, "conversations": 3}),
                         ("synthetic", {"seed": 4, "requests": 6})):
        assert build_workload(name, **params).fingerprint() == \
            old.build_workload(name, **params).fingerprint(), name
