"""The setup of a service whose domain logic is not built yet: it runs, declares the
control-plane topology (common.runner does) and answers ``status``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from common.bus import RabbitBus
from common.messages import Delivery
from common.runner import Setup
from common.settings import ServiceSettings


def status_only(service: str) -> Setup:
    async def setup(
        bus: RabbitBus, settings: ServiceSettings
    ) -> Callable[[], Awaitable[None]] | None:
        async def status(params: dict[str, Any], delivery: Delivery) -> dict[str, Any]:
            return {"service": service, "ready": True}

        await bus.serve(service, {"status": status})
        return None

    return setup
