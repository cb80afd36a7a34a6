"""Wires the rollout service: the only place that builds its connections and clients."""

from __future__ import annotations

from datetime import timedelta

from common import redis_client
from common.audit import AuditLog
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.fleet import FleetView
from common.lease import Lease
from common.messages import Message
from common.operators import RosterView
from common.settings import ServiceSettings
from common.wiring import Consumed, Wiring
from services.rollout import handlers, windows
from services.rollout.controller import Controller
from services.rollout.deferrals import Deferrals
from services.rollout.settings import RolloutSettings
from services.rollout.store import DIRTY, LEASE, PREFIX, RolloutStore


async def setup(bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None) -> Wiring:
    own = (
        settings
        if isinstance(settings, RolloutSettings)
        else RolloutSettings(**settings.model_dump())
    )
    clock = clock or SystemClock()
    redis = redis_client.from_settings(own)
    fleet = FleetView(redis, PREFIX, changed=DIRTY)
    roster = RosterView(redis, PREFIX + "roster")
    store = RolloutStore(redis, fleet)
    controller = Controller(
        store, clock, Lease(redis, LEASE, own.lease_seconds), tick_seconds=own.tick_seconds
    )

    async def send(message: Message) -> None:
        await bus.publish(message)

    audit = AuditLog(redis, PREFIX + "audit", clock, timedelta(days=own.audit_retention_days))
    deferrals = Deferrals(store, clock, audit, send, controller.wake)
    deps = handlers.Deps(
        store=store,
        clock=clock,
        wake=controller.wake,
        outcome=controller.outcome_reported,
        send=send,
        defer=deferrals.on_defer,
    )
    return Wiring(
        redis=redis,
        outbox=store.outbox,
        consumes=[
            Consumed("rollout.events", [*fleet.event_routes(), *roster.routes()]),
            Consumed("rollout.cells", handlers.cell_routes(deps)),
        ],
        answers=[*handlers.rpc_routes(deps), *windows.rpc_routes(deps)],
        roles=roster.role_of,
        audit=audit,
        loops={"controller": controller.run},
    )
