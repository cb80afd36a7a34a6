"""A customer's deferral of their cell's updates (common/deferrals.py): decided against the
policy's budget, kept with the cell, answered on the cell's command queue, and audited.

What a cell sends is untrusted: the deferral's time is checked against the budget here, its
reason is cleaned and bounded by the message, and a cell speaks only for itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from common.audit import AuditLog
from common.bus.errors import refuse_foreign_sender
from common.clock import Clock
from common.deferrals import DeferralDecided
from common.fields import printable
from common.messages import CellSync, Delivery, Message
from common.requests.audit import AuditRecord
from common.requests.rollout import RolloutPolicy
from services.rollout.model import Rollout
from services.rollout.store import RolloutStore


@dataclass(frozen=True)
class Decision:
    accepted: bool
    until: datetime | None
    reason: str


def decide(
    msg: CellSync, policy: RolloutPolicy, rollouts: list[Rollout], now: datetime
) -> Decision:
    """Accept a deferral within the budget, or refuse it saying why. An accepted one names the
    deadlines that will go through it."""
    if msg.defer_cancel:
        return Decision(True, None, "deferral cancelled")
    until = msg.defer_until
    if until is None:
        return Decision(False, None, "until: missing (when should updates resume?)")
    if until <= now:
        return Decision(False, None, f"until: {until.isoformat()} is in the past")
    budget = timedelta(days=policy.max_deferral_days)
    if until > now + budget:
        return Decision(
            False,
            None,
            f"until: {until.isoformat()} is past the vendor's budget of"
            f" {policy.max_deferral_days:g} days (at most {(now + budget).isoformat()})",
        )
    through = sorted(
        (r.deadline, r.version)
        for r in rollouts
        if r.deadline is not None and r.deadline < until and r.state != "aborted"
    )
    note = "; ".join(f"{v} is applied from {d.isoformat()} (its deadline)" for d, v in through)
    return Decision(
        True, until, f"deferred until {until.isoformat()}" + (f"; {note}" if note else "")
    )


@dataclass(frozen=True)
class Deferrals:
    store: RolloutStore
    clock: Clock
    audit: AuditLog
    send: Callable[[Message], Awaitable[None]]
    wake: Callable[[], None]

    async def on_defer(self, msg: CellSync, delivery: Delivery) -> None:
        refuse_foreign_sender(msg, delivery)
        cell = await self.store.cell(msg.cell_id)
        if cell is None or msg.defer_id is None:
            return
        now = self.clock.now()
        decision = decide(msg, await self.store.policy(), await self.store.rollouts(), now)
        if decision.accepted:
            await self.store.set_deferral(cell.id, decision.until, msg.defer_reason)
            self.wake()
        await self.audit.record(
            AuditRecord(
                at=self.audit.now(),
                service="rollout",
                method="cell.defer" if not msg.defer_cancel else "cell.defer.cancel",
                operator=delivery.user_id or "",
                role="cell",
                result="ok" if decision.accepted else "refused",
                target=cell.id,
                detail=printable(f"{decision.reason} (reason given: {msg.defer_reason})")[:300],
                message_id=delivery.message_id or "",
            )
        )
        # Answered again for a redelivered request: the agent keeps the newest answer.
        await self.send(
            DeferralDecided(
                cell_id=cell.id,
                issued_at=now,
                request_id=msg.defer_id,
                accepted=decision.accepted,
                until=decision.until if decision.accepted else cell.deferred_until,
                reason=decision.reason,
            )
        )
