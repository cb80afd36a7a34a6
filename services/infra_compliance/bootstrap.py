"""Wires the infra_compliance service: the only place that builds its connections and clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common import redis_client
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.lease import Lease
from common.settings import ServiceSettings
from services.infra_compliance import handlers
from services.infra_compliance.aws import InfraAws
from services.infra_compliance.settings import InfraSettings
from services.infra_compliance.store import LEASE, InfraStore
from services.infra_compliance.timers import Timers

log = logging.getLogger(__name__)


async def setup(
    bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None
) -> Callable[[], Awaitable[None]]:
    own = settings if isinstance(settings, InfraSettings) else InfraSettings(
        **settings.model_dump()
    )  # fmt: skip
    clock = clock or SystemClock()
    redis = redis_client.from_settings(own)
    store = InfraStore(redis)
    aws = InfraAws(own.aws_region, own.templates_bucket)
    stop = asyncio.Event()
    background: set[asyncio.Task[int]] = set()

    def reconcile_all() -> None:
        task = asyncio.get_running_loop().create_task(handlers.reconcile_fleet(deps))
        background.add(task)
        task.add_done_callback(background.discard)

    timers = Timers(
        store, clock, Lease(redis, LEASE, own.lease_seconds), aws.notify,
        lambda: handlers.reconcile_fleet(deps), tick_seconds=own.tick_seconds,
    )  # fmt: skip
    deps = handlers.Deps(
        store=store, clock=clock, aws=aws, wake_timers=timers.wake, reconcile_all=reconcile_all
    )
    await bus.consume("infra_compliance.events", handlers.event_routes(deps))
    await bus.serve(
        "infra_compliance",
        handlers.rpc_routes(deps),
        before_reply=redis_client.Durability.of(redis, own).wait,
    )
    tasks = [
        asyncio.create_task(store.outbox.relay(bus, stop), name="infra-outbox"),
        asyncio.create_task(timers.run(stop), name="infra-timers"),
    ]

    async def cleanup() -> None:
        stop.set()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
        await redis.aclose()

    return cleanup
