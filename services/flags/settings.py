"""The flags service's own settings, beside the common ones."""

from __future__ import annotations

from pydantic import Field

from common.settings import ServiceSettings


class FlagsSettings(ServiceSettings):
    broadcast_confirm_seconds: float = Field(
        default=60.0,
        gt=0,
        description="how long a change's broadcast waits for the broker's confirm: the broker "
        "confirms once every cell's queue has the snapshot on disk, which with many thousands "
        "of queues takes longer than a single publish's timeout",
    )
