"""Settings of the controller's health loop: checks, restarts with backoff, drains."""

from __future__ import annotations

from pydantic import BaseModel, Field


class HealingConfig(BaseModel):
    """How the controller watches and heals its pools."""

    reconcile_interval_s: float = Field(1.0, description="time between reconcile passes")
    health_timeout_s: float = Field(5.0, description="a health call slower than this fails")
    unhealthy_after: int = Field(3, ge=1, description=(
        "failed health checks in a row before a live but unresponsive worker is replaced"))
    backoff_initial_s: float = Field(1.0, description="wait before restarting a failed pool")
    backoff_max_s: float = Field(60.0, description="longest wait between restarts of a pool")
    stable_after_s: float = Field(60.0, description=(
        "a worker serving this long resets its pool's restart backoff"))
    drain_timeout_s: float = Field(120.0, description=(
        "longest a draining worker may take to finish its requests before it is stopped"))
