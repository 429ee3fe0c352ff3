"""SLA planner: sizes the prefill and decode pools (aggregated: the pool `both`) from TTFT/ITL
targets (docs/planner.md)."""

from services.planner.config import PlannerConfig
from services.planner.planner import Planner, StepReport

__all__ = ["Planner", "PlannerConfig", "StepReport"]
