"""The budget per cell: the registry's heartbeats, and every other report wherever a service
consumes it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from common import limits
from common.bus.errors import Refused
from common.limits import PerCellLimit, limit_cell_reports
from common.messages import CellSync, Delivery, FlagsChanged
from common.routes import route


def test_a_cell_gets_its_burst_then_its_rate_and_others_are_untouched() -> None:
    limit = PerCellLimit(rate=2, burst=5)
    assert [limit.allow("flooder", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    # Another cell's budget is its own.
    assert limit.allow("quiet", 0.0)
    # Half a second refills one heartbeat at 2 a second; no more.
    assert limit.allow("flooder", 0.5)
    assert not limit.allow("flooder", 0.5)
    # A long silence refills up to the burst, never past it.
    assert [limit.allow("flooder", 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_a_rate_of_zero_is_no_limit() -> None:
    limit = PerCellLimit(rate=0, burst=1)
    assert all(limit.allow("cell", 0.0) for _ in range(1000))


def test_idle_cells_are_forgotten_when_there_are_many(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "_PRUNE_AT", 3)
    limit = PerCellLimit(rate=1, burst=2)
    for cell in ("a", "b", "c"):
        limit.allow(cell, 0.0)
    limit.allow("d", 10.0)  # a, b and c have refilled since: forgotten
    assert set(limit._buckets) == {"d"}


def _delivery(user: str | None, key: str = "x.sync") -> Delivery:
    return Delivery(message_id=None, user_id=user, routing_key=key, redelivered=False,
                    delivery_count=0)  # fmt: skip


async def test_a_cells_reports_past_its_budget_are_not_handled_and_count_against_the_sender() -> (
    None
):
    handled: list[str] = []

    async def on_sync(msg: CellSync, delivery: Delivery) -> None:
        handled.append(msg.cell_id)

    async def on_event(msg: FlagsChanged, delivery: Delivery) -> None:
        handled.append("event")

    now = 0.0
    routes = limit_cell_reports(
        [route(CellSync, on_sync), route(FlagsChanged, on_event)],
        {"sync": (1.0, 3)},
        now=lambda: now,
    )
    sync_handler = {r.model: r.handler for r in routes}[CellSync]
    event_handler = {r.model: r.handler for r in routes}[FlagsChanged]
    sent = datetime(2026, 12, 6, tzinfo=UTC)

    def sync(cell: str) -> CellSync:
        return CellSync(cell_id=cell, seq=1, sent_at=sent)

    for _ in range(10):
        await sync_handler(sync("flooder"), _delivery("flooder", "flooder.sync"))
    # One speaking for another cell is refused (dead-lettered), over budget or not.
    with pytest.raises(Refused):
        await sync_handler(sync("quiet"), _delivery("flooder", "quiet.sync"))
    await sync_handler(sync("quiet"), _delivery("quiet", "quiet.sync"))
    event = FlagsChanged(at=sent, key="f", snapshot_version=1, actor="op")
    for _ in range(10):
        await event_handler(event, _delivery(None, "flags.changed"))
    assert handled == ["flooder"] * 3 + ["quiet"] + ["event"] * 10
    now = 1.0
    await sync_handler(sync("flooder"), _delivery("flooder", "flooder.sync"))
    assert handled[-1] == "flooder" and len(handled) == 15
