"""Wires the rollout service: the only place that builds its connections and clients."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from common import redis_client
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.fleet import FleetView
from common.lease import Lease
from common.messages import Message
from common.settings import ServiceSettings
from services.rollout import handlers
from services.rollout.controller import Controller
from services.rollout.settings import RolloutSettings
from services.rollout.store import DIRTY, LEASE, PREFIX, RolloutStore


async def setup(
    bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None
) -> Callable[[], Awaitable[None]]:
    own = settings if isinstance(settings, RolloutSettings) else RolloutSettings(
        **settings.model_dump()
    )  # fmt: skip
    clock = clock or SystemClock()
    redis = redis_client.from_settings(own)
    fleet = FleetView(redis, PREFIX, changed=DIRTY)
    store = RolloutStore(redis, fleet)
    controller = Controller(
        store, clock, Lease(redis, LEASE, own.lease_seconds), tick_seconds=own.tick_seconds
    )

    async def send(message: Message) -> None:
        await bus.publish(message)

    deps = handlers.Deps(
        store=store,
        clock=clock,
        wake=controller.wake,
        outcome=controller.outcome_reported,
        send=send,
    )
    await bus.consume("rollout.events", fleet.event_routes())
    await bus.consume("rollout.cells", handlers.cell_routes(deps))
    await bus.serve(
        "rollout",
        handlers.rpc_routes(deps),
        before_reply=redis_client.Durability.of(redis, own).wait,
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(store.outbox.relay(bus, stop), name="rollout-outbox"),
        asyncio.create_task(controller.run(stop), name="rollout-controller"),
    ]

    async def cleanup() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis.aclose()

    return cleanup
