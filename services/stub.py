"""The setup of a service whose domain logic is not built yet: it runs, declares the
control-plane topology (common.runner does) and answers ``status``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from common.bus.rabbit_bus import RabbitBus
from common.messages import Delivery
from common.requests import ServiceStatus, Status
from common.routes import route
from common.runner import Setup
from common.settings import ServiceSettings


def status_only(service: str) -> Setup:
    async def setup(
        bus: RabbitBus, settings: ServiceSettings
    ) -> Callable[[], Awaitable[None]] | None:
        async def status(req: Status, delivery: Delivery) -> ServiceStatus:
            return ServiceStatus(service=service, ready=True)

        await bus.serve(service, [route(Status, status)])
        return None

    return setup
