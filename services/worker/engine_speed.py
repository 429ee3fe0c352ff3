"""What a worker measures of its own engine for the router's cost model (router/cost_model.py).

- the prompt work waiting: requests that compute their prompt here and have no first token
  yet, and their prompt tokens;
- the running batch: requests past their first token;
- the engine step time with no prefill in it, as a fixed part plus a part per decoding
  request (a least-squares line through recent decode-only steps);
- the prefill speed: prompt tokens computed per second of prefill work, where a step's
  prefill work is its duration less the decode-only step time at its batch;
- decode workers: how long a remotely prefilled request takes from its arrival to its first
  token (the KV pull plus a step).

Every figure is an exponentially decayed average over recent steps (half-life `half_life_s`
of engine time), so it follows the engine's speed as the machine's load changes. A step's
duration is the time between two consecutive scheduler reports while the engine had requests
(vLLM reports after every step); a longer gap is idle time and is not a sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class _Pending:
    prompt_tokens: int
    remote: bool
    arrived: float


class _Decayed:
    """Sums that decay with time: sample weights halve every `half_life_s`."""

    def __init__(self, n: int, half_life_s: float) -> None:
        self.v = [0.0] * n
        self._rate = math.log(2) / half_life_s
        self._at: float | None = None

    def add(self, now: float, *xs: float) -> None:
        if self._at is not None:
            k = math.exp(-self._rate * max(now - self._at, 0.0))
            self.v = [a * k for a in self.v]
        self._at = now
        self.v = [a + x for a, x in zip(self.v, xs)]


class EngineSpeed:
    """Measures one engine from its request lifecycle and its per-step scheduler reports."""

    def __init__(self, half_life_s: float = 10.0, idle_gap_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._idle_gap_s = idle_gap_s
        self._pending: dict[str, _Pending] = {}
        self._decoding: set[str] = set()
        # decode-only steps: Σw, Σw·B, Σw·B², Σw·dt, Σw·B·dt
        self._decode = _Decayed(5, half_life_s)
        # prefill: Σ prompt tokens computed, Σ seconds of prefill work
        self._prefill = _Decayed(2, half_life_s)
        # remote first token: Σ count, Σ seconds
        self._remote = _Decayed(2, half_life_s)
        self._last_step: float | None = None
        self._busy = False

    # --- request lifecycle (the worker's API calls these) ----------------------------------
    def started(self, request_id: str, prompt_tokens: int, remote: bool = False) -> None:
        """A request entered the engine; `remote`: its KV comes from a prefill worker."""
        self._pending[request_id] = _Pending(prompt_tokens, remote, self._clock())

    def first_output(self, request_id: str) -> None:
        """The request's first token came out: its prefill is done."""
        p = self._pending.pop(request_id, None)
        if p is None:
            return
        self._decoding.add(request_id)
        if p.remote:
            now = self._clock()
            self._remote.add(now, 1.0, now - p.arrived)

    def ended(self, request_id: str) -> None:
        """The request left the engine (finished, aborted or failed)."""
        self._pending.pop(request_id, None)
        self._decoding.discard(request_id)

    # --- engine steps ----------------------------------------------------------------------
    def step(self, num_running: int, num_waiting: int, iteration_stats: Any = None) -> None:
        """One scheduler report (one engine step); `iteration_stats` is vLLM's IterationStats
        of that step's outputs (None when the step produced none)."""
        now = self._clock()
        computed = 0
        new_tokens = 0
        first_tokens = 0
        if iteration_stats is not None:
            computed = int(iteration_stats.prompt_token_stats.computed)
            new_tokens = int(iteration_stats.num_generation_tokens)
            first_tokens = len(iteration_stats.time_to_first_tokens_iter)
        if self._busy and self._last_step is not None:
            dt = now - self._last_step
            if 0 < dt < self._idle_gap_s:
                self.observe_step(dt, decoding=max(new_tokens - first_tokens, 0),
                                  prefill_tokens=computed,
                                  prefilling=self._prefill_in_progress() or computed > 0)
        self._last_step = now
        self._busy = num_running + num_waiting > 0

    def _prefill_in_progress(self) -> bool:
        return any(not p.remote for p in self._pending.values())

    def observe_step(self, dt: float, decoding: int, prefill_tokens: int,
                     prefilling: bool) -> None:
        """One step of `dt` seconds that decoded `decoding` requests and finished the prefill
        of `prefill_tokens` prompt tokens; `prefilling`: prefill work ran in it (a prompt
        chunk may finish in a later step, so its tokens count when they are done)."""
        now = self._clock()
        if not prefilling:
            b = float(decoding)
            self._decode.add(now, 1.0, b, b * b, dt, b * dt)
            return
        work = max(dt - self.step_time(decoding), 0.0)
        self._prefill.add(now, float(prefill_tokens), work)

    # --- figures ---------------------------------------------------------------------------
    def step_line(self) -> tuple[float, float]:
        """(fixed part, per decoding request) of the decode-only step time; (0, 0) until a
        decode-only step has been seen."""
        n, sb, sbb, sdt, sbdt = self._decode.v
        if n <= 0:
            return 0.0, 0.0
        mean_b, mean_dt = sb / n, sdt / n
        var_b = sbb / n - mean_b ** 2
        if var_b < 0.25:  # batch sizes too alike to tell the slope: one mean step time
            return mean_dt, 0.0
        slope = max((sbdt / n - mean_b * mean_dt) / var_b, 0.0)
        return max(mean_dt - slope * mean_b, 0.0), slope

    def step_time(self, decoding: int) -> float:
        fixed, per_seq = self.step_line()
        return fixed + per_seq * decoding

    def prefill_tokens_per_s(self) -> float:
        tokens, seconds = self._prefill.v
        # a few tokens over a rounding error of a step are no measurement
        return tokens / seconds if tokens >= 32 and seconds > 1e-4 else 0.0

    def remote_kv_wait_s(self) -> float:
        n, seconds = self._remote.v
        return seconds / n if n > 0 else 0.0

    def figures(self) -> dict[str, float | int]:
        """The WorkerLoad fields this measures."""
        local = [p for p in self._pending.values() if not p.remote]
        fixed, per_seq = self.step_line()
        return {
            "pending_prefill_reqs": len(local),
            "pending_prompt_tokens": sum(p.prompt_tokens for p in local),
            "decoding_reqs": len(self._decoding),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s(), 3),
            "step_s": round(fixed, 6),
            "step_per_seq_s": round(per_seq, 7),
            "remote_kv_wait_s": round(self.remote_kv_wait_s(), 6),
        }
