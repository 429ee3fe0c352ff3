"""The kv policy's cost model: each candidate's time to first token, from its own figures.

For a request of N prompt tokens on a worker w that would compute u of them (its cached prefix
left out):

    work(w)  = Q(w) + u                 prompt tokens w computes before the first token
    ttft(w)  = work / R(w) + steps * D(w) + U(w) * load_weight * N / R(w)
    steps    = max(1, ceil(work / step_tokens))
    D(w)     = step_s + step_per_seq_s * (B(w) + 1)

- Q(w): prompt tokens queued ahead on w: this gateway's own requests there with no first
  token yet (their uncached part, as routed) plus other gateways' (the worker's published
  pending prompt tokens less this gateway's part of them at the worker's snapshot time);
- B(w): requests decoding on w, counted the same way;
- R(w), step_s, step_per_seq_s: the worker's measured prefill speed and decode step time
  (services/worker/engine_speed.py);
- U(w): requests known only as a count (sent since the snapshot by a caller that keeps no
  ledger), each priced as `load_weight` of this prompt's whole prefill.

A worker that has not measured its speed yet (just started, or an older worker) is priced as
the count-based model did: no token figures, U(w) = requests ahead (see `queue_depth`), at the
pool's measured speed (or in token units when no worker has measured).

A decode worker that receives the KV from a prefill worker adds, after the prefill worker's
ttft: max(remote_kv_wait_s, D) + Q/R + U * load_weight * N / R (the KV pull and its first
step, behind whatever prefill it has queued).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

from router.dispatch_ledger import OwnLoad
from router.registry import WorkerInfo


def queue_depth(w: WorkerInfo, in_flight: Mapping[str, int]) -> int:
    """Requests ahead on a worker: the largest of what its engine reports (running + waiting),
    what its API has accepted (all gateways, as of its last heartbeat) and what this gateway
    has in flight on it now (exact, but only this gateway's). Not their sum: the published
    figures already include this gateway's requests, and counting them twice would push
    requests away from the worker holding their cache."""
    engine = w.load.num_running_reqs + w.load.num_waiting_reqs
    return max(engine, w.load.in_flight, in_flight.get(w.worker_id, 0))


@dataclass(frozen=True)
class PoolSpeed:
    """Speed figures to price an unmeasured worker with: the measured workers' means."""

    prefill_tokens_per_s: float = 1.0
    step_s: float = 0.0
    step_per_seq_s: float = 0.0
    measured: bool = False

    @classmethod
    def of(cls, workers: Sequence[WorkerInfo]) -> "PoolSpeed":
        m = [w.load for w in workers if w.load.prefill_tokens_per_s > 0]
        if not m:
            return cls()
        return cls(sum(x.prefill_tokens_per_s for x in m) / len(m),
                   sum(x.step_s for x in m) / len(m),
                   sum(x.step_per_seq_s for x in m) / len(m), True)


class WorkerEstimate(NamedTuple):
    """What the cost model believes of one worker now (immutable; a named tuple, made for
    every candidate of every decision: about a quarter of a frozen dataclass's cost)."""

    worker: WorkerInfo
    measured: bool
    prefill_tokens_per_s: float
    queued_tokens: float
    pending_reqs: int
    """requests on the worker waiting for their first token (they share its next steps)"""
    decoding_reqs: int
    unknown_reqs: int
    step_s: float
    step_per_seq_s: float
    remote_kv_wait_s: float

    def step_time(self) -> float:
        """D: one engine step with this request added to the running batch."""
        return self.step_s + self.step_per_seq_s * (self.decoding_reqs + 1)


def estimate(w: WorkerInfo, own: OwnLoad | None, in_flight: Mapping[str, int],
             pool: PoolSpeed) -> WorkerEstimate:
    """The worker's figures, made fresh with this gateway's own dispatches (`own`, None when
    the caller keeps no ledger)."""
    load = w.load
    if load.prefill_tokens_per_s <= 0:
        return WorkerEstimate(w, False, pool.prefill_tokens_per_s, 0.0, 0, 0,
                              queue_depth(w, in_flight), pool.step_s, pool.step_per_seq_s,
                              load.remote_kv_wait_s)
    if own is not None:
        others_tokens = max(load.pending_prompt_tokens - own.snapshot_pending_prompt_tokens, 0)
        others_decoding = max(load.decoding_reqs - own.snapshot_decoding_reqs, 0)
        queued = own.pending_uncached_tokens + others_tokens
        pending = own.pending_reqs + max(load.pending_prefill_reqs - own.snapshot_pending_reqs, 0)
        decoding = own.decoding_reqs + others_decoding
        unknown = 0
    else:
        queued = load.pending_prompt_tokens
        pending = load.pending_prefill_reqs
        decoding = load.decoding_reqs
        unknown = max(in_flight.get(w.worker_id, 0) - load.in_flight, 0)
    return WorkerEstimate(w, True, load.prefill_tokens_per_s, float(queued), pending, decoding,
                          unknown,
                          load.step_s, load.step_per_seq_s, load.remote_kv_wait_s)


def prefill_ttft(e: WorkerEstimate, uncached_tokens: int, prompt_tokens: int,
                 load_weight: float, step_tokens: int) -> float:
    """Seconds to the first token if `e`'s worker computes `uncached_tokens` of the prompt."""
    r = e.prefill_tokens_per_s
    work = e.queued_tokens + uncached_tokens
    steps = max(1, math.ceil(work / step_tokens))
    return work / r + steps * e.step_time() + e.unknown_reqs * load_weight * prompt_tokens / r


def receive_tail(e: WorkerEstimate, prompt_tokens: int, load_weight: float) -> float:
    """Seconds a decode worker adds after a prefill worker's ttft: the KV pull and its first
    step, behind the prefill it has queued."""
    r = e.prefill_tokens_per_s
    return (max(e.remote_kv_wait_s, e.step_time()) + e.queued_tokens / r
            + e.unknown_reqs * load_weight * prompt_tokens / r)
