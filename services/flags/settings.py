"""The flags service's own settings, beside the common ones."""

from __future__ import annotations

from pydantic import Field, field_validator

from common.settings import ServiceSettings
from common.vocabulary import STAGES


class FlagsSettings(ServiceSettings):
    broadcast_confirm_seconds: float = Field(
        default=60.0,
        gt=0,
        description="how long a change's broadcast waits for the broker's confirm: the broker "
        "confirms once every cell's queue has the snapshot on disk, which with many thousands "
        "of queues takes longer than a single publish's timeout",
    )
    approval_stages: str = Field(
        default="",
        description="stages, comma-separated (e.g. dedicated), where a flag change that changes "
        "any cell's answer waits for a second operator's approval (flags approve)",
    )
    due_interval_seconds: float = Field(
        default=1.0, gt=0, description="how often timed flag changes are looked for"
    )

    @field_validator("approval_stages")
    @classmethod
    def _stages(cls, value: str) -> str:
        for stage in (s.strip() for s in value.split(",") if s.strip()):
            if stage not in STAGES:
                raise ValueError(f"{stage!r} is not a stage ({', '.join(STAGES)})")
        return value

    def approval(self) -> frozenset[str]:
        return frozenset(s.strip() for s in self.approval_stages.split(",") if s.strip())
