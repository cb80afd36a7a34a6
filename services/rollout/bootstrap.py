"""Wires the rollout service: the only place that builds its connections and clients."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

import redis.asyncio as aioredis

from common.bus import RabbitBus
from common.clock import Clock, SystemClock
from common.lease import Lease
from common.messages import Message
from common.settings import ServiceSettings
from services.rollout import handlers
from services.rollout.controller import Controller
from services.rollout.settings import RolloutSettings
from services.rollout.store import LEASE, RolloutStore


async def setup(
    bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None
) -> Callable[[], Awaitable[None]]:
    own = settings if isinstance(settings, RolloutSettings) else RolloutSettings(
        **settings.model_dump()
    )  # fmt: skip
    clock = clock or SystemClock()
    redis = aioredis.from_url(own.redis_url, decode_responses=True)
    store = RolloutStore(redis)
    controller = Controller(
        store, clock, Lease(redis, LEASE, own.lease_seconds), tick_seconds=own.tick_seconds
    )

    async def send(message: Message) -> None:
        await bus.publish(message)

    deps = handlers.Deps(store=store, clock=clock, wake=controller.wake, send=send)
    await bus.consume(
        "rollout.events", {cls: partial(fn, deps=deps) for cls, fn in handlers.EVENTS.items()}
    )
    await bus.consume(
        "rollout.cells",
        {cls: partial(fn, deps=deps) for cls, fn in handlers.CELL_REPORTS.items()},
    )
    await bus.serve("rollout", {name: partial(fn, deps=deps) for name, fn in handlers.RPC.items()})
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
