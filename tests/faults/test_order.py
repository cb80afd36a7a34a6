"""Messages delivered twice and out of order (RELIABILITY.md 5 and 6), through the real broker
and whole processes: state only moves forward, and a duplicate changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE, CellHeartbeat, CellReport, CellUpgrade
from testing.broker import raw_publish
from testing.cells import show
from testing.fleet import Fleet, quick_fleet
from testing.ledger import Ledger, applier_env
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services


@pytest.fixture
async def private(machine: Services) -> Services:
    """This module faults processes only: the machine's broker and Redis serve it."""
    return machine


TWICE = {"SUBSTRATE_FAULT_DUPLICATES": "1"}


@pytest.mark.fault
@pytest.mark.chaos
async def test_every_message_delivered_twice(
    fprocs: Processes, moto: str, tmp_path: Path, fbus: RabbitBus
) -> None:
    """5. The registry, the rollout service and every agent publish each message twice (the same
    message id, as a publisher retrying after a lost confirm would): commands, reports,
    heartbeats and events all arrive twice. The rollout ends as it would without: each cell on
    the release, one generation each, applied once, one outcome recorded per cell."""
    registry = await start_registry(fprocs, SUBSTRATE_OFFLINE_AFTER_SECONDS="20", **TWICE)
    fleet = await quick_fleet(fprocs, moto, tmp_path, fbus, **TWICE)
    await fleet.tap()
    cells = await fleet.add("staging", 1, **applier_env(), **TWICE)
    cells += await fleet.add("saas", 1, **applier_env(), **TWICE)
    cells += await fleet.add("dedicated", 2, **applier_env(), **TWICE)
    version = await fleet.publish(1)

    done = await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()
    assert sum(stage["updated"] for stage in done["stages"].values()) == len(cells), done
    assert sum(stage["failed"] for stage in done["stages"].values()) == 0, done
    reports = await fleet.upgrades()
    for cell in cells:
        mine = [r for r in reports if r.cell_id == cell.id]
        assert len({r.generation for r in mine}) == 1, (cell.id, mine)
        # Every report arrived twice; the rollout recorded one outcome.
        outcomes = [r for r in mine if r.phase == "succeeded"]
        assert len(outcomes) == 2 and outcomes[0] == outcomes[1], outcomes
    # The duplicates reached the registry, which applied each heartbeat once.
    assert await registry.metric("substrate_heartbeats_total", outcome="stale") > 0


async def _report(url: str, cell: str, msg: CellReport) -> None:
    await raw_publish(url, CELLS_EXCHANGE, f"{cell}.{msg.kind}", msg.model_dump_json().encode(),
                      type=msg.wire_name, user_id=cell)  # fmt: skip


@pytest.mark.fault
async def test_heartbeats_and_reports_out_of_order(fleet: Fleet) -> None:
    """6. After a cell's upgrade succeeded, its earlier reports arrive again in reverse order,
    and an older heartbeat after a newer one: the rollout keeps the outcome, the registry keeps
    the newer heartbeat, and the release is applied once."""
    await fleet.tap()
    cells = await fleet.add("staging", 1, **applier_env())
    cells += await fleet.add("dedicated", 1, **applier_env())
    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed", timeout=120)
    await fleet.wait_installed(cells, version, timeout=60)

    procs = fleet.procs
    staging = cells[0]
    before = await fleet.explain(staging)
    reports = [r for r in await fleet.upgrades() if r.cell_id == staging.id]
    assert [r.phase for r in reports][-1] == "succeeded", reports
    # The agent is stopped so that nothing it sends meanwhile hides what the replay does.
    await fleet.stop_agent(staging)
    record = await show(procs, staging.id)
    for old in reversed(reports[:-1]):
        await _report(staging.url, staging.id, old)
    # And a step of the same generation that reports a failure, after its success.
    failed = CellUpgrade.model_validate(
        {**reports[-1].model_dump(), "phase": "failed", "error": "a late, stale report"}
    )
    await _report(staging.url, staging.id, failed)
    old_beat = CellHeartbeat(cell_id=staging.id, seq=1, sent_at=datetime.now(UTC),
                             agent_version="old", installed_release="1.0.0")  # fmt: skip
    await _report(staging.url, staging.id, old_beat)

    async def consumed() -> bool:
        queues = ("registry.cells", "rollout.cells")
        return all([(await fleet.bus.queue_state(q)).messages == 0 for q in queues])

    await eventually(consumed, timeout=30, interval=0.2, what="the replayed reports consumed")
    after = await show(procs, staging.id)
    assert after["installed_release"] == version == record["installed_release"]
    assert after["agent_version"] == record["agent_version"] != "old", (record, after)
    assert after["last_heartbeat_at"] == record["last_heartbeat_at"]
    assert (await fleet.explain(staging)) == before
    assert (await fleet.status(version))["state"] == "completed"
    Ledger.of([(c.id, c.state) for c in cells], version).check()
