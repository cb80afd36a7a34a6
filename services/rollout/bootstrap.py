"""Wires the rollout service: the only place that builds its connections and clients."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

import redis.asyncio as aioredis

from common.bus import RabbitBus
from common.clock import Clock, SystemClock
from common.settings import ServiceSettings
from services.rollout import handlers
from services.rollout.store import RolloutStore


async def setup(
    bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None
) -> Callable[[], Awaitable[None]]:
    redis = aioredis.from_url(settings.redis_url, decode_responses=True)
    deps = handlers.Deps(store=RolloutStore(redis), clock=clock or SystemClock())
    await bus.consume(
        "rollout.events", {cls: partial(fn, deps=deps) for cls, fn in handlers.EVENTS.items()}
    )
    await bus.consume(
        "rollout.cells",
        {cls: partial(fn, deps=deps) for cls, fn in handlers.CELL_REPORTS.items()},
    )
    await bus.serve("rollout", {name: partial(fn, deps=deps) for name, fn in handlers.RPC.items()})
    stop = asyncio.Event()
    relay = asyncio.create_task(deps.store.outbox.relay(bus, stop), name="rollout-outbox")

    async def cleanup() -> None:
        stop.set()
        await asyncio.gather(relay, return_exceptions=True)
        await redis.aclose()

    return cleanup
