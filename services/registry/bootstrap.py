"""Wires the registry: the only place that builds its connections and clients."""

from __future__ import annotations

import functools
import logging
from functools import partial

import redis.asyncio as aioredis

from common import broker_urls, redis_client
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.limits import PerCellLimit
from common.operators import admins_from
from common.rabbitmq_api import RabbitApi
from common.wiring import Consumed, Wiring, every
from services.registry import handlers
from services.registry.broker import CellBroker
from services.registry.operators import (
    Operators,
    OperatorStore,
    rpc_routes,
)
from services.registry.pages import Pages, listing
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)


def build_deps(
    bus: RabbitBus,
    settings: RegistrySettings,
    redis: aioredis.Redis,
    clock: Clock,
    accounts: CellBroker,
) -> handlers.Deps:
    store = RegistryStore(redis)
    return handlers.Deps(
        store=store,
        pages=Pages(functools.partial(listing, store), clock.monotonic),
        clock=clock,
        accounts=accounts,
        publisher=bus,
        cell_broker_url=settings.cell_amqp_url or settings.amqp_url,
        privatelink_service=settings.privatelink_service_name,
        offline_after=settings.offline_after_seconds,
        credential_grace=settings.credential_grace_seconds,
        heartbeat_limit=PerCellLimit(settings.heartbeat_limit_per_second, settings.heartbeat_burst),
        cell_ca=settings.cell_ca_file.read_text() if settings.cell_ca_file else "",
    )


async def setup(bus: RabbitBus, settings: RegistrySettings, clock: Clock | None = None) -> Wiring:
    redis = redis_client.from_settings(settings)
    accounts = CellBroker(
        RabbitApi(settings.rabbitmq_api_url),
        bus,
        broker_urls.vhost(settings.amqp_url),
        queues=settings.cell_queues,
    )
    clock = clock or SystemClock()
    deps = build_deps(bus, settings, redis, clock, accounts)
    operators = Operators(
        OperatorStore(redis, deps.store.outbox, clock),
        accounts.api,
        accounts.vhost,
        clock,
        admins_from(settings.admins),
    )
    added = await deps.store.build_indexes()
    if added:
        log.info("indexed %d cells created before the id and org indexes", added)
    return Wiring(
        redis=redis,
        outbox=deps.store.outbox,
        # Heartbeats are most of the traffic: a deeper prefetch keeps one round trip to Redis
        # carrying many of them.
        consumes=[
            Consumed("registry.cells", handlers.cell_routes(deps), prefetch=256),
            Consumed("registry.events", handlers.event_routes(deps)),
        ],
        answers=[*handlers.rpc_routes(deps), *rpc_routes(operators)],
        roles=operators.store.role_of,
        loops={
            "sweep": every(
                settings.sweep_interval, partial(handlers.sweep, deps), "liveness sweep"
            ),
            # At start and again and again: a management API that did not answer at start,
            # or an operator's deletion, leaves the queues unbounded only until the next try.
            # Cells are served meanwhile; the log says why the broker's limits are missing.
            "policies": every(
                settings.policy_interval_seconds,
                accounts.ensure_policies,
                "applying the broker policies that bound queue storage",
            ),
            # Again and again, for services that started after its last change.
            "roster": every(
                settings.roster_interval_seconds,
                operators.store.publish_roster,
                "publishing the operators' roster",
            ),
        },
    )
