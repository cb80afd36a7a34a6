"""Wires the infra_compliance service: the only place that builds its connections and clients."""

from __future__ import annotations

import asyncio
import logging

from common import redis_client
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.lease import Lease
from common.operators import RosterView
from common.settings import ServiceSettings
from common.wiring import Consumed, Wiring
from services.infra_compliance import handlers
from services.infra_compliance.aws import InfraAws
from services.infra_compliance.settings import InfraSettings
from services.infra_compliance.store import LEASE, PREFIX, InfraStore
from services.infra_compliance.timers import Timers

log = logging.getLogger(__name__)


async def setup(bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None) -> Wiring:
    own = (
        settings if isinstance(settings, InfraSettings) else InfraSettings(**settings.model_dump())
    )
    clock = clock or SystemClock()
    redis = redis_client.from_settings(own)
    store = InfraStore(redis)
    roster = RosterView(redis, PREFIX + "roster")
    aws = InfraAws(own.aws_region, own.templates_bucket)
    background: set[asyncio.Task[int]] = set()

    def reconcile_all() -> None:
        task = asyncio.get_running_loop().create_task(handlers.reconcile_fleet(deps))
        background.add(task)
        task.add_done_callback(background.discard)

    timers = Timers(
        store,
        clock,
        Lease(redis, LEASE, own.lease_seconds),
        aws.notify,
        lambda: handlers.reconcile_fleet(deps),
        tick_seconds=own.tick_seconds,
    )
    deps = handlers.Deps(
        store=store, clock=clock, aws=aws, wake_timers=timers.wake, reconcile_all=reconcile_all
    )
    return Wiring(
        redis=redis,
        outbox=store.outbox,
        consumes=[
            Consumed("infra_compliance.events", [*handlers.event_routes(deps), *roster.routes()])
        ],
        answers=handlers.rpc_routes(deps),
        roles=roster.role_of,
        loops={"timers": timers.run},
        background=background,
    )
