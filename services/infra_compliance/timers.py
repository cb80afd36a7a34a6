"""The timer loop: reminders and deadlines, fired by one replica at a time.

Every replica runs the loop; the holder of the lease fires what is due. A timer fires in one
write, fenced on the lease and guarded on the cell's record as read, that also removes it: so a
timer fires once even if the holder dies right after (the next holder finds it gone) or stalls
past its lease (its write is refused). The holder also publishes the organisations' SNS notices
and, now and then, brings every cell up to date (a safety net for a publish whose replica died
before it had).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import datetime

from common.clock import Clock
from common.lease import Lease
from common.messages import Event, InfraComplianceChanged, InfraReminder
from common.runner import wait_any
from services.infra_compliance import metrics, model
from services.infra_compliance.store import LEASE, InfraStore, Notice, record_of

log = logging.getLogger(__name__)

FULL_RECONCILE_SECONDS = 60.0
# A timer is tried this often while the cell's record keeps changing under it.
FIRE_TRIES = 5


class FenceLost(Exception):
    """Another replica holds the lease now."""


Notify = Callable[[str, str, str, str], Awaitable[None]]


def notice_for(event: InfraReminder | InfraComplianceChanged, org: str) -> Notice:
    """What the customer's topic is sent: a reminder, or the deadline passed."""
    if isinstance(event, InfraReminder):
        subject = f"Substrate: apply infrastructure template {event.required_version}"
        message = (
            f"Cell {event.cell_id} ({event.org}) must apply infrastructure template version "
            f"{event.required_version} by {event.deadline.isoformat()}, or it stops receiving "
            f"updates and falls out of its support SLA. Template: {event.location}. "
            f"Reminder {event.reminder} of {event.of}. "
            "Preview the change with `cell-agent infra preview`, apply it with "
            "`cell-agent infra apply`."
        )
    else:
        subject = f"Substrate: cell {event.cell_id} is out of SLA"
        message = (
            f"Cell {event.cell_id} ({org}) did not apply infrastructure template version "
            f"{event.required_version} by {event.deadline.isoformat() if event.deadline else '-'}"
            ": it gets no application updates until it does (`cell-agent infra apply`)."
        )
    return Notice(id=uuid.uuid4().hex, org=org, subject=subject, message=message)


class Timers:
    def __init__(
        self,
        store: InfraStore,
        clock: Clock,
        lease: Lease,
        notify: Notify,
        reconcile_fleet: Callable[[], Awaitable[int]],
        *,
        tick_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.lease = lease
        self.notify = notify
        self.reconcile_fleet = reconcile_fleet
        self.tick_seconds = tick_seconds
        self._wake = asyncio.Event()
        self._reconciled_at = 0.0
        self._fence: str | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.tick()
            except FenceLost:
                log.warning("timer lease lost mid-tick; another replica fires the timers now")
            except Exception:
                log.exception("timer tick failed; retrying")
            await wait_any(stop, self._wake, timeout=await self._pause())
        with suppress(Exception):
            await self.lease.release()

    async def _pause(self) -> float:
        due = await self.store.next_due()
        if due is None:
            return self.tick_seconds
        return min(self.tick_seconds, max(0.0, (due - self.clock.now()).total_seconds()))

    async def tick(self) -> bool:
        """Fire what is due, send the notices, refresh the gauges; False if another replica
        holds the lease."""
        fence = await self.lease.hold()
        if fence is None:
            self._fence = None
            return False
        if fence != self._fence:
            # Newly the holder: notices a previous holder took and did not finish go again.
            await self.store.recover_notices()
            self._fence = fence
        now = self.clock.now()
        for timer in await self.store.due(now):
            await self.fire(fence, timer, now)
        await self.send_notices()
        if time.monotonic() - self._reconciled_at > FULL_RECONCILE_SECONDS:
            self._reconciled_at = time.monotonic()
            await self.reconcile_fleet()
        await self.observe(now)
        return True

    async def fire(self, fence: str, timer: model.Timer, now: datetime) -> None:
        for _ in range(FIRE_TRIES):
            raw = await self.store.record(timer.cell_id)
            cell = await self.store.fleet.get(timer.cell_id)
            org = (cell.org if cell else None) or "-"
            new, events, command = model.fire(
                record_of(raw), timer, org, cell.template_version if cell else None, now
            )
            notices = [
                notice_for(e, org)
                for e in events
                if isinstance(e, InfraReminder | InfraComplianceChanged)
            ]
            written = await self.store.fire(
                self.lease,
                fence,
                timer,
                raw,
                new=new,
                events=events,
                command=command,
                notices=notices,
            )
            if written:
                self._count(timer, events)
                return
            if await self.store.redis.get(LEASE) != fence:
                raise FenceLost(fence)
        log.warning("timer %s: the cell's record kept changing; next tick", timer.member)

    def _count(self, timer: model.Timer, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, InfraReminder):
                metrics.REMINDERS.inc()
                log.info(
                    "cell %s reminded (%d of %d) of its deadline %s",
                    timer.cell_id,
                    event.reminder,
                    event.of,
                    event.deadline,
                )
            elif isinstance(event, InfraComplianceChanged):
                metrics.BREACHES.inc()
                log.warning(
                    "cell %s is out of SLA: template %s not applied by %s",
                    timer.cell_id,
                    event.required_version,
                    timer.deadline,
                )

    async def send_notices(self) -> None:
        """Publish the organisations' notices in order; one that fails stays first in line."""
        while (notice := await self.store.next_notice()) is not None:
            try:
                await self.notify(notice.org, notice.subject, notice.message, notice.id)
            except Exception as exc:
                metrics.NOTICES.labels("failed").inc()
                log.warning("notice to %s not sent (%r); retrying next tick", notice.org, exc)
                await self.store.notice_failed(notice)
                return
            await self.store.notice_sent(notice)
            metrics.NOTICES.labels("sent").inc()

    async def observe(self, now: datetime) -> None:
        for state, n in (await self.store.counts()).items():
            metrics.CELLS.labels(state).set(n)
        nearest = await self.store.nearest_deadline()
        metrics.NEAREST_DEADLINE.set(
            0 if nearest is None else max(0.0, (nearest - now).total_seconds())
        )
