"""The flags service's push: a change reaches every cell in one broadcast, and a cell that
syncs behind the current snapshot gets one addressed to it.

No cell reads another customer's names, rules or descriptions (common/flags.py ``for_reader``):
the broadcast carries the flags as a cell that no condition names reads them, and each cell a
condition names (its id or org listed, or matched by a pattern) is sent its own snapshot first,
which the broadcast of the same version then does not replace."""

from __future__ import annotations

import asyncio
import logging

from common.bus.errors import BusError, Unroutable
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock
from common.flags import Snapshot, naming, wire_for_reader
from common.fleet import FleetCell
from common.messages import FlagsBroadcast, FlagsSnapshot
from common.runner import wait_any
from services.flags import metrics, model
from services.flags.store import FlagsStore

log = logging.getLogger(__name__)

# Snapshots of their own in flight at once, for the cells a change's conditions name.
PERSONAL_AT_ONCE = 256


class Pusher:
    """Broadcasts the current snapshot after a change, and answers a cell's sync with a snapshot
    of its own (with its attributes). Changes that arrive while a push runs are folded into the
    next one; a cell that misses a push (a failed publish) gets the snapshot when it next
    syncs."""

    def __init__(
        self,
        bus: RabbitBus,
        store: FlagsStore,
        clock: Clock,
        *,
        broadcast_confirm_seconds: float = 60.0,
    ) -> None:
        self.bus, self.store, self.clock = bus, store, clock
        self.broadcast_confirm_seconds = broadcast_confirm_seconds
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def send(self, cell_id: str, snapshot: Snapshot, why: str = "sync") -> None:
        cell = await self.store.fleet.get(cell_id) or FleetCell(cell_id)
        await self._publish(cell_id, cell, snapshot, why)

    async def _publish(self, cell_id: str, cell: FleetCell, snapshot: Snapshot, why: str) -> None:
        msg = FlagsSnapshot(
            cell_id=cell_id,
            issued_at=self.clock.now(),
            version=snapshot.version,
            flags=tuple(wire_for_reader(snapshot, model.reader(cell_id, cell))),
            cell=model.cell_attributes(cell),
        )
        try:
            await self.bus.publish(msg)
        except Unroutable:
            metrics.PUSHED.labels(why, "no_queue").inc()  # decommissioned meanwhile
            return
        except BusError as exc:
            metrics.PUSHED.labels(why, "failed").inc()
            log.warning(
                "snapshot %d to %s not sent (%s); it gets it on its next sync",
                snapshot.version,
                cell_id,
                exc,
            )
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
        names = naming(snapshot.flags)
        named = [
            cell
            for cell in await self.store.fleet.all()
            if cell.status != "decommissioned" and names(model.reader(cell.id, cell))
        ]
        for start in range(0, len(named), PERSONAL_AT_ONCE):
            await asyncio.gather(
                *(
                    self._publish(cell.id, cell, snapshot, "named")
                    for cell in named[start : start + PERSONAL_AT_ONCE]
                )
            )
        msg = FlagsBroadcast(
            issued_at=self.clock.now(),
            version=snapshot.version,
            flags=tuple(wire_for_reader(snapshot, None)),
        )
        try:
            await self.bus.publish(
                msg, confirm_timeout=max(self.broadcast_confirm_seconds, self.bus.publish_timeout)
            )
        except Unroutable:
            metrics.PUSHED.labels("change", "no_queue").inc()  # no cell yet
            return
        except BusError as exc:
            metrics.PUSHED.labels("change", "failed").inc()
            log.warning(
                "snapshot %d not broadcast (%s); cells get it on their next sync",
                snapshot.version,
                exc,
            )
            return
        metrics.PUSHED.labels("change", "sent").inc()
        log.info("flags snapshot %d broadcast to every cell", snapshot.version)
