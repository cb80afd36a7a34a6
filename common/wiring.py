"""What every service does once its parts are built: consume its queues, answer its requests,
run its loops until it is stopped, then stop them the same way.

A service's ``bootstrap.setup`` builds its store, its handlers' dependencies and its loops, and
returns them as a ``Wiring``; ``start`` (called by the runner) does the rest, so each bootstrap
says only what is its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge
from redis.exceptions import RedisError

from common import redis_client
from common.audit import AuditLog, Guard
from common.bus.rabbit_bus import RabbitBus
from common.clock import SystemClock
from common.limits import limit_cell_reports
from common.operators import RoleSource, admins_from
from common.outbox import Outbox
from common.routes import Route
from common.settings import ServiceSettings

log = logging.getLogger(__name__)

# A loop a service runs until the event is set.
Loop = Callable[[asyncio.Event], Coroutine[Any, Any, object]]
Cleanup = Callable[[], Awaitable[None]]


def every(interval: float, work: Callable[[], Awaitable[object]], what: str) -> Loop:
    """A loop that does ``work`` at once and then every ``interval`` seconds until the service
    stops; a failure is logged and the work tried again at the next interval."""

    async def loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await work()
            except Exception:
                log.exception("%s failed; trying again in %gs", what, interval)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    return loop


# What on-call alerts on besides the service's own metrics: whether its Redis answers, and
# how many events wait in its outbox (growing: the broker refuses or is away).
REDIS_UP = Gauge("substrate_redis_up", "1 while the service's Redis answers a PING", ["service"])
OUTBOX_PENDING = Gauge(
    "substrate_outbox_pending", "Events written but not yet published, by service", ["service"]
)
VITALS_SECONDS = 5.0


async def _vitals(service: str, wiring: Wiring) -> None:
    try:
        await asyncio.wait_for(wiring.redis.ping(), VITALS_SECONDS)
        OUTBOX_PENDING.labels(service).set(await wiring.outbox.pending())
        REDIS_UP.labels(service).set(1)
    except (RedisError, OSError, TimeoutError):
        REDIS_UP.labels(service).set(0)


@dataclass(frozen=True)
class Consumed:
    """A queue the service consumes, how its deliveries are routed, and how many it takes in
    at once."""

    queue: str
    routes: Sequence[Route]
    prefetch: int = 32


@dataclass(frozen=True)
class Wiring:
    """A service's parts, built by its bootstrap."""

    redis: aioredis.Redis
    # Events written with the service's state changes, published by a relay loop.
    outbox: Outbox
    consumes: Sequence[Consumed]
    # The request/reply methods it answers (``substrate.rpc``, routing key the service name).
    answers: Sequence[Route]
    # The role of an operator's broker user: the registry's own operators, or the roster every
    # other service keeps from its events (common/operators.py).
    roles: RoleSource | None = None
    # The service's audit log, where it records more than requests (rollout: deferrals);
    # None: one is made for the requests.
    audit: AuditLog | None = None
    loops: Mapping[str, Loop] = field(default_factory=dict)
    # Tasks the service starts on its own as it runs; waited for when it stops.
    background: set[asyncio.Task[Any]] = field(default_factory=set)


async def start(service: str, bus: RabbitBus, settings: ServiceSettings, wiring: Wiring) -> Cleanup:
    """Consume, answer (an answer waits for Redis replicas to have the request's writes), and
    run the outbox relay and the service's loops. Returns what stops the loops and closes
    Redis, once the bus has stopped consuming."""
    for consumed in wiring.consumes:
        # What a cell sends is budgeted per cell wherever it is consumed.
        routes = limit_cell_reports(consumed.routes, settings.cell_budgets)
        await bus.consume(consumed.queue, routes, prefetch=consumed.prefetch)
    if wiring.answers:
        assert wiring.roles is not None, f"{service} answers requests but knows no roles"
        durability = redis_client.Durability.of(wiring.redis, settings)
        guard = Guard(
            service,
            wiring.roles,
            admins_from(settings.admins),
            wiring.audit
            or AuditLog(
                wiring.redis,
                f"{service}:audit",
                SystemClock(),
                timedelta(days=settings.audit_retention_days),
            ),
        )
        await bus.serve(service, wiring.answers, before_reply=durability.wait, guard=guard)
    stop = asyncio.Event()
    loops: dict[str, Loop] = {
        "outbox": partial(wiring.outbox.relay, bus),
        "vitals": every(VITALS_SECONDS, partial(_vitals, service, wiring), "vitals"),
        **wiring.loops,
    }
    tasks = [
        asyncio.create_task(loop(stop), name=f"{service}-{name}") for name, loop in loops.items()
    ]

    async def cleanup() -> None:
        stop.set()
        await asyncio.gather(*tasks, *wiring.background, return_exceptions=True)
        await wiring.redis.aclose()

    return cleanup
