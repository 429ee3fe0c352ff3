"""Scorers of the routing pipeline (router/plugins.py), by name: each prices a candidate in
seconds. `KVPolicyConfig.scorer_weights` composes them."""

from __future__ import annotations

from router.scorers.cold_spread import ColdSpreadScorer
from router.scorers.kv_pressure import KVPressureScorer
from router.scorers.shared_step import SharedStepScorer
from router.scorers.ttft import TTFTScorer

SCORERS: dict[str, type] = {s.name: s for s in (TTFTScorer, KVPressureScorer, ColdSpreadScorer,
                                                SharedStepScorer)}

__all__ = ["SCORERS", "ColdSpreadScorer", "KVPressureScorer", "SharedStepScorer",
           "TTFTScorer"]
