"""The routing-policy plugin interface: filters drop candidates, scorers price each candidate,
a picker chooses.

A candidate is one worker in one part of a request's route: it either `computes` the prompt
(a prefill worker, an aggregated worker, or a decode worker prefilling locally) or receives
its KV from a prefill worker. Every scorer returns a cost in **seconds** (of time to first
token, or time it makes other requests wait), so the pipeline can add them with plain
weights; the picker takes the cheapest. A new scorer is a class with a `name` and a `cost`
method, registered in `router.scorers.SCORERS`; it may also have a `costs` method pricing a
decision's candidates at once (the same figures as `cost` for each: one call per decision, not
one per candidate).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple, Protocol, Sequence

from router.cost_model import WorkerEstimate


class Candidate(NamedTuple):
    """One worker considered for one part of a route (immutable; a named tuple, made for
    every candidate of every decision)."""

    estimate: WorkerEstimate
    cached_tokens: int
    """prompt tokens the worker holds (its longest cached prefix)"""
    computes: bool
    """True: it computes the uncached part; False: it receives the KV from a prefill worker"""

    @property
    def worker_id(self) -> str:
        return self.estimate.worker.worker_id


@dataclass
class RouteContext:
    """What every plugin knows of the request being routed."""

    prompt_tokens: int
    load_weight: float = 0.25
    step_tokens: int = 2048
    affinity_rate: Callable[[str], float] = field(default=lambda worker_id: 0.0)
    """requests per second recently routed to a worker for its cache (see AffinityRate)"""
    best_cached: int = 0
    """the most prompt tokens any candidate holds"""

    def uncached(self, c: Candidate) -> int:
        return max(self.prompt_tokens - c.cached_tokens, 0) if c.computes else 0

    def cold(self, c: Candidate) -> int:
        """The prompt tokens `c` would compute that no worker holds (0: it receives the KV):
        prefill work some worker must do, wherever the request goes."""
        return min(self.uncached(c), max(self.prompt_tokens - self.best_cached, 0))


class Filter(Protocol):
    """Drops candidates that must not serve the request."""

    name: str

    def keep(self, c: Candidate, ctx: RouteContext) -> bool: ...


class Scorer(Protocol):
    """Prices a candidate, in seconds. (Optional: ``costs(cands, ctx) -> list[float]``, each
    candidate's ``cost`` in one call.)"""

    name: str

    def cost(self, c: Candidate, ctx: RouteContext) -> float: ...


class Priced(NamedTuple):
    """A decision's candidates priced by the pipeline (in the candidates' order)."""

    costs: list[float]
    """each candidate's cost: its scorers' weighted costs summed"""
    parts: list[tuple[str, list[float]]]
    """each scorer's name and weighted cost of every candidate"""

    def breakdown(self, i: int) -> dict[str, float]:
        """Each scorer's weighted cost of the ``i``-th candidate."""
        return {name: col[i] for name, col in self.parts}


_MAX_TIE_SETS = 4096  # candidate sets whose tie rotation a GreedyPicker remembers


class GreedyPicker:
    """The cheapest candidate; ties: the one holding more of the prompt, then round robin."""

    def __init__(self) -> None:
        self._ties: dict[tuple[str, ...], itertools.count] = {}

    def pick(self, cands: Sequence[Candidate], costs: Sequence[float],
             ctx: RouteContext) -> int:
        best = min(zip(costs, (-c.cached_tokens for c in cands)))
        ties = [i for i, c in enumerate(cands) if (costs[i], -c.cached_tokens) == best]
        if len(ties) == 1:
            return ties[0]
        # a rotation per candidate set, kept only for sets that tied (a gateway's shortlists
        # vary from decision to decision: one per set ever seen would grow without bound)
        key = tuple(c.worker_id for c in cands)
        turn = self._ties.get(key)
        if turn is None:
            if len(self._ties) >= _MAX_TIE_SETS:
                self._ties.clear()
            turn = self._ties[key] = itertools.count()
        return ties[next(turn) % len(ties)]


class SoftmaxPicker:
    """Samples with softmax(-cost / (temperature * the prompt's whole prefill time))."""

    def __init__(self, temperature: float, seed: int | None = None) -> None:
        self.temperature = temperature
        self._rng = random.Random(seed)

    def pick(self, cands: Sequence[Candidate], costs: Sequence[float],
             ctx: RouteContext) -> int:
        r = min(c.estimate.prefill_tokens_per_s for c in cands)
        unit = max(ctx.prompt_tokens, 1) / r
        lo = min(costs)
        weights = [math.exp(-(x - lo) / (self.temperature * unit)) for x in costs]
        return self._rng.choices(range(len(cands)), weights=weights)[0]


class Pipeline:
    """Filters, then weighted scorers, then a picker."""

    def __init__(self, scorers: Sequence[tuple[Scorer, float]],
                 filters: Sequence[Filter] = (), picker: GreedyPicker | SoftmaxPicker | None
                 = None) -> None:
        self.scorers = list(scorers)
        self.filters = list(filters)
        self.picker = picker or GreedyPicker()
        # each scorer's pricing of a list of candidates: its own `costs`, else `cost` each
        self._batch: list[tuple[str, float, Callable[[Sequence[Candidate], RouteContext],
                                                      list[float]]]] = [
            (s.name, w, getattr(s, "costs", None) or partial(_one_by_one, s))
            for s, w in self.scorers]

    def filter(self, cands: Sequence[Candidate], ctx: RouteContext) -> list[Candidate]:
        """Candidates every filter keeps; all of them if that would leave none."""
        if not self.filters:
            return list(cands)
        kept = [c for c in cands if all(f.keep(c, ctx) for f in self.filters)]
        return kept or list(cands)

    def cost(self, c: Candidate, ctx: RouteContext) -> float:
        return sum(weight * s.cost(c, ctx) for s, weight in self.scorers if weight)

    def breakdown(self, c: Candidate, ctx: RouteContext) -> dict[str, float]:
        """Each scorer's weighted cost of `c` (for logs and tests)."""
        return self.priced(c, ctx)[1]

    def priced(self, c: Candidate, ctx: RouteContext) -> tuple[float, dict[str, float]]:
        """`cost` and `breakdown` of `c` together, each scorer asked once (the cost is the
        same sum as `cost`'s, in the same order)."""
        parts: dict[str, float] = {}
        counted: list[float] = []
        for s, weight in self.scorers:
            v = parts[s.name] = weight * s.cost(c, ctx)
            if weight:
                counted.append(v)
        return sum(counted), parts

    def price(self, cands: Sequence[Candidate], ctx: RouteContext) -> Priced:
        """`priced` of every candidate, each scorer asked once for all of them (the same
        figures, summed in the same order)."""
        parts: list[tuple[str, list[float]]] = []
        counted: list[list[float]] = []
        for name, weight, batch in self._batch:
            col = [weight * v for v in batch(cands, ctx)]
            parts.append((name, col))
            if weight:
                counted.append(col)
        costs = [sum(t) for t in zip(*counted)] if counted else [0] * len(cands)
        return Priced(costs, parts)

    def pick(self, cands: Sequence[Candidate], costs: Sequence[float],
             ctx: RouteContext) -> int:
        return self.picker.pick(cands, costs, ctx)


def _one_by_one(scorer: Scorer, cands: Sequence[Candidate], ctx: RouteContext) -> list[float]:
    return [scorer.cost(c, ctx) for c in cands]
