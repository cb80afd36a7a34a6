"""No report is forgotten across an outage: a cell finishes an upgrade (and leaves maintenance)
while the broker is down; what it could not send is kept in its state directory and sent, in
order, when the link returns, and the registry's view converges."""

from __future__ import annotations

from typing import Any

import pytest

from testing.cells import show, shown_if
from testing.fleet import Cell, Fleet
from testing.ledger import Ledger, applied, applier_env
from testing.nodes import PrivateRabbit
from testing.polling import eventually


def _kept(cell: Cell) -> int:
    return len(list((cell.state / "outbox").glob("*.json")))


@pytest.mark.fault
async def test_reports_made_while_the_broker_is_down_are_sent_in_order_when_it_returns(
    fleet: Fleet, rabbit: PrivateRabbit
) -> None:
    await fleet.tap()
    # Every phase reported at once, so there is an order of several kinds to keep.
    (cell,) = await fleet.add(
        "staging", 1, **applier_env(apply_seconds=4), CELL_PROGRESS_REPORT_SECONDS="0"
    )
    version = await fleet.publish(1, maintenance=True)

    async def in_maintenance() -> dict[str, Any] | None:
        return await shown_if(fleet.procs, cell.id, lambda r: r["maintenance"])

    await eventually(in_maintenance, timeout=60, interval=0.1, what="the cell in maintenance")
    await rabbit.kill()
    # The cell applies on its own, leaves maintenance and succeeds with nobody to tell.
    await eventually(lambda: applied(cell.state), timeout=30, interval=0.1, what="applied")
    await eventually(lambda: _kept(cell) >= 2, timeout=30, interval=0.1,
                     what="'left maintenance' and 'succeeded' kept in the outbox")  # fmt: skip

    await rabbit.start()
    await eventually(lambda: _kept(cell) == 0, timeout=90, interval=0.3,
                     what="the kept reports sent")  # fmt: skip
    await fleet.wait_state(version, "completed", timeout=60)
    record = await show(fleet.procs, cell.id)
    assert record["installed_release"] == version and record["maintenance"] is False, record
    assert record["maintenance_since"] is None and record["maintenance_seconds_total"] > 0

    # Every phase of the generation arrived, in the order the cell made them.
    phases = [u.phase for u in await fleet.upgrades() if u.cell_id == cell.id]
    firsts = list(dict.fromkeys(phases))  # duplicates (redeliveries) allowed, order kept
    assert firsts == ["accepted", "verifying", "applying", "succeeded"], phases
    seqs = [u.seq for u in await fleet.upgrades() if u.cell_id == cell.id]
    assert seqs == sorted(seqs), "sent in the order they were made"
    Ledger.of([(cell.id, cell.state)], version).check()
