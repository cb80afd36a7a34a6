"""Wires the flags service: the only place that builds its connections and clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common import redis_client
from common.bus.errors import BusError, Unroutable
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.flags import Snapshot
from common.fleet import FleetCell
from common.messages import FlagsBroadcast, FlagsSnapshot
from common.runner import wait_any
from common.settings import ServiceSettings
from services.flags import handlers, metrics
from services.flags.store import FlagsStore

log = logging.getLogger(__name__)

# The broker confirms a broadcast once every cell's queue has it on disk: with 10,000 queues
# that took 9-23 s here (bench/RESULTS.md), past the 10 s a single publish gets, and the
# change was counted failed though it reached every cell. The pusher's loop is the only one
# waiting on it.
BROADCAST_CONFIRM_SECONDS = 60.0


class Pusher:
    """Broadcasts the current snapshot after a change, and answers a cell's sync with a snapshot
    of its own (with its attributes). Changes that arrive while a push runs are folded into the
    next one; a cell that misses a push (a failed publish) gets the snapshot when it next
    syncs."""

    def __init__(self, bus: RabbitBus, store: FlagsStore, clock: Clock) -> None:
        self.bus, self.store, self.clock = bus, store, clock
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def send(self, cell_id: str, snapshot: Snapshot, why: str = "sync") -> None:
        cell = await self.store.fleet.get(cell_id) or FleetCell(cell_id)
        await self._publish(cell_id, cell, snapshot, why)

    async def _publish(self, cell_id: str, cell: FleetCell, snapshot: Snapshot,
                       why: str) -> None:  # fmt: skip
        # What the agent cannot know by itself; it adds its id, release and agent version.
        attributes = {k: v for k in ("stage", "region", "org") if (v := getattr(cell, k))}
        msg = FlagsSnapshot(cell_id=cell_id, issued_at=self.clock.now(), version=snapshot.version,
                            flags=tuple(snapshot.to_wire()), cell=attributes)  # fmt: skip
        try:
            await self.bus.publish(msg)
        except Unroutable:
            metrics.PUSHED.labels(why, "no_queue").inc()  # decommissioned meanwhile
            return
        except BusError as exc:
            metrics.PUSHED.labels(why, "failed").inc()
            log.warning("snapshot %d to %s not sent (%s); it gets it on its next sync",
                        snapshot.version, cell_id, exc)  # fmt: skip
            return
        metrics.PUSHED.labels(why, "sent").inc()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_any(stop, self._changed)
            if stop.is_set():
                return
            self._changed.clear()
            try:
                await self.push_all()
            except Exception:
                log.exception("pushing the flags snapshot failed; cells get it when they sync")

    async def push_all(self) -> None:
        """One publish for the whole fleet: the broker fans the snapshot out to every cell's
        command queue (an offline cell's waits there). Its attributes stay out of it; each
        agent keeps those of the last snapshot addressed to it."""
        snapshot = await self.store.snapshot()
        metrics.SNAPSHOT_VERSION.set(snapshot.version)
        msg = FlagsBroadcast(issued_at=self.clock.now(), version=snapshot.version,
                             flags=tuple(snapshot.to_wire()))  # fmt: skip
        try:
            await self.bus.publish(
                msg, confirm_timeout=max(BROADCAST_CONFIRM_SECONDS, self.bus.publish_timeout)
            )
        except Unroutable:
            metrics.PUSHED.labels("change", "no_queue").inc()  # no cell yet
            return
        except BusError as exc:
            metrics.PUSHED.labels("change", "failed").inc()
            log.warning("snapshot %d not broadcast (%s); cells get it on their next sync",
                        snapshot.version, exc)  # fmt: skip
            return
        metrics.PUSHED.labels("change", "sent").inc()
        log.info("flags snapshot %d broadcast to every cell", snapshot.version)


async def setup(
    bus: RabbitBus, settings: ServiceSettings, clock: Clock | None = None
) -> Callable[[], Awaitable[None]]:
    clock = clock or SystemClock()
    redis = redis_client.from_settings(settings)
    store = FlagsStore(redis)
    pusher = Pusher(bus, store, clock)
    deps = handlers.Deps(
        store=store, clock=clock, changed=pusher.changed, send_snapshot=pusher.send
    )
    metrics.SNAPSHOT_VERSION.set(await store.version())
    await bus.consume("flags.events", store.fleet.event_routes())
    await bus.consume("flags.cells", handlers.cell_routes(deps))
    await bus.serve(
        "flags",
        handlers.rpc_routes(deps),
        before_reply=redis_client.Durability.of(redis, settings).wait,
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(store.outbox.relay(bus, stop), name="flags-outbox"),
        asyncio.create_task(pusher.run(stop), name="flags-pusher"),
    ]

    async def cleanup() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis.aclose()

    return cleanup
