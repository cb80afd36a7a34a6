"""Wires the flags service: the only place that builds its connections and clients."""

from __future__ import annotations

import logging
from functools import partial

from common import redis_client
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.operators import RosterView
from common.settings import ServiceSettings
from common.wiring import Consumed, Wiring, every
from services.flags import changes, handlers, metrics
from services.flags.push import Pusher
from services.flags.settings import FlagsSettings
from services.flags.store import PREFIX, FlagsStore

log = logging.getLogger(__name__)


async def setup(bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None) -> Wiring:
    own = (
        settings if isinstance(settings, FlagsSettings) else FlagsSettings(**settings.model_dump())
    )
    clock = clock or SystemClock()
    redis = redis_client.from_settings(own)
    store = FlagsStore(redis)
    roster = RosterView(redis, PREFIX + "roster")
    pusher = Pusher(bus, store, clock, broadcast_confirm_seconds=own.broadcast_confirm_seconds)
    deps = handlers.Deps(
        store=store,
        clock=clock,
        changed=pusher.changed,
        send_snapshot=pusher.send,
        approval_stages=own.approval(),
    )
    metrics.SNAPSHOT_VERSION.set(await store.version())
    indexed = await store.fleet.index_targets()
    if indexed:
        log.info("entered %d cells known before the fleet's targets were kept", indexed)
    return Wiring(
        redis=redis,
        outbox=store.outbox,
        consumes=[
            Consumed("flags.events", [*store.fleet.event_routes(), *roster.routes()]),
            Consumed("flags.cells", handlers.cell_routes(deps)),
        ],
        answers=[*handlers.rpc_routes(deps), *changes.rpc_routes(deps)],
        roles=roster.role_of,
        loops={
            "pusher": pusher.run,
            "due": every(
                own.due_interval_seconds,
                partial(changes.run_due, deps),
                "making timed flag changes",
            ),
        },
    )
