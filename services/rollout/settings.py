"""The rollout service's own settings, beside the common ones."""

from __future__ import annotations

from pydantic import Field

from common.settings import ServiceSettings


class RolloutSettings(ServiceSettings):
    tick_seconds: float = Field(
        default=1.0,
        gt=0,
        description="the controller's longest pause between steps (operators' actions and "
        "outcome reports wake it sooner); soak ends, progress deadlines and changes in the "
        "fleet (a cell registered, back online, its hold lifted) are acted on within this",
    )
    lease_seconds: float = Field(
        default=15.0,
        gt=0,
        description="the controller lease's TTL: how long a replica waits before taking over "
        "from one that died",
    )
