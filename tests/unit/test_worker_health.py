"""The worker's engine-stall check (services/worker/process.py): an engine with requests in
flight and no step for longer than the timeout is stalled; an idle engine that has just been
given a request is not (CI saw a healthy worker replaced for that: idle 90 s, then a request
arrived 27 ms before a health check)."""

from __future__ import annotations

from services.worker.process import stalled_seconds


def test_nothing_in_flight_is_never_stalled() -> None:
    assert stalled_seconds(None, last_step_at=0.0, now=1000.0) == 0.0
    assert stalled_seconds(None, last_step_at=10.0, now=1000.0) == 0.0


def test_a_request_after_a_long_idle_time_is_not_a_stall() -> None:
    # last step at t=100, idle until a request at t=190.0, health check at t=190.027
    assert stalled_seconds(190.0, last_step_at=100.0, now=190.027) < 0.1


def test_no_step_since_work_arrived_is_a_stall() -> None:
    assert stalled_seconds(190.0, last_step_at=100.0, now=260.0) == 70.0
    # never stepped at all (an engine that hangs on its first request)
    assert stalled_seconds(5.0, last_step_at=0.0, now=70.0) == 65.0


def test_steps_while_busy_reset_the_clock() -> None:
    assert stalled_seconds(100.0, last_step_at=250.0, now=260.0) == 10.0
