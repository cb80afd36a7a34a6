"""Wires the infra_compliance service. It answers `status` so operators can see it is up; its own
handlers arrive with the issue that builds it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from common.bus import RabbitBus
from common.messages import Delivery
from common.settings import ServiceSettings


async def setup(bus: RabbitBus, settings: ServiceSettings) -> Callable[[], Awaitable[None]] | None:
    async def status(params: dict[str, Any], delivery: Delivery) -> dict[str, Any]:
        return {"service": "infra_compliance", "ready": True}

    await bus.serve("infra_compliance", {"status": status})
    return None
