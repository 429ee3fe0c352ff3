"""What a worker measures of its engine: decode step time, prefill speed, waiting prompt
work, the remote first-token wait."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.worker.engine_speed import EngineSpeed


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def stats(computed: int = 0, generated: int = 0, first: int = 0) -> SimpleNamespace:
    return SimpleNamespace(prompt_token_stats=SimpleNamespace(computed=computed),
                           num_generation_tokens=generated,
                           time_to_first_tokens_iter=[0.1] * first)


def test_step_line_and_prefill_speed_from_steps() -> None:
    clock = Clock()
    s = EngineSpeed(clock=clock)
    for b in [1, 2, 4, 8, 3, 6] * 4:  # decode-only steps: 4 ms + 1 ms per request
        s.observe_step(0.004 + 0.001 * b, decoding=b, prefill_tokens=0, prefilling=False)
        clock.t += 0.01
    fixed, per_seq = s.step_line()
    assert fixed == pytest.approx(0.004) and per_seq == pytest.approx(0.001)
    for _ in range(10):  # 500 prompt tokens at 2,000 tok/s alongside 2 decoding requests
        s.observe_step(0.006 + 500 / 2000, decoding=2, prefill_tokens=500, prefilling=True)
        clock.t += 0.3
    assert s.prefill_tokens_per_s() == pytest.approx(2000)


def test_steps_timed_between_reports_and_idle_gaps_skipped() -> None:
    clock = Clock()
    s = EngineSpeed(clock=clock)
    s.started("a", 640)
    s.step(num_running=1, num_waiting=0)       # the step that starts a's prefill
    clock.t += 0.32                            # 640 tokens at 2,000 tok/s
    s.step(1, 0, stats(computed=640, generated=1, first=1))
    s.first_output("a")
    for _ in range(5):                         # a decodes alone: 5 ms steps
        clock.t += 0.005
        s.step(1, 0, stats(generated=1))
    s.ended("a")
    clock.t += 0.005
    s.step(0, 0, stats(generated=1))
    clock.t += 30.0                            # idle
    s.step(0, 0)
    assert s.step_time(1) == pytest.approx(0.005)
    # the prefill step had no decode-only reference yet when it was seen: all of it counted
    assert s.prefill_tokens_per_s() == pytest.approx(2000)


def test_figures_published() -> None:
    clock = Clock()
    s = EngineSpeed(clock=clock)
    s.started("local1", 300)
    s.started("local2", 200)
    s.started("remote", 900, remote=True)
    s.started("done", 50)
    s.first_output("done")
    clock.t = 0.04
    s.first_output("remote")
    f = s.figures()
    assert f["pending_prefill_reqs"] == 2 and f["pending_prompt_tokens"] == 500
    assert f["decoding_reqs"] == 2
    assert f["remote_kv_wait_s"] == pytest.approx(0.04)
    assert f["prefill_tokens_per_s"] == 0.0 and f["step_s"] == 0.0  # nothing measured yet
