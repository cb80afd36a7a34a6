"""Processes that die at the worst moment (RELIABILITY.md 3, 4, 5 and 9), through the named
crash points of common/crashpoints.py: the process exits at once, as under kill -9, right after
the step. Each test restarts what died (without the crash point) and ends with the ledger."""

from __future__ import annotations

import signal

import pytest

from common.crashpoints import CRASH_EXIT
from common.messages import CellUpgrade, DesiredState
from common.vocabulary import TERMINAL_PHASES
from testing.fleet import Cell, Fleet
from testing.ledger import Ledger, applier_env
from testing.polling import eventually
from testing.processes import Proc, start_rollout
from testing.services import Services


@pytest.fixture
async def private(machine: Services) -> Services:
    """This module faults processes only: the machine's broker and Redis serve it."""
    return machine


CRASH = "SUBSTRATE_CRASH_AT"


async def _crashed(proc: Proc) -> bool:
    return proc.process.returncode is not None


async def _cells(fleet: Fleet) -> list[Cell]:
    cells = await fleet.add("staging", 1, **applier_env())
    cells += await fleet.add("saas", 1, **applier_env())
    return cells + await fleet.add("dedicated", 2, **applier_env())


async def _crash_the_rollout_service(fleet: Fleet, at: str) -> str:
    """Replace the rollout service with one that crashes at ``at``; publish a release; wait for
    the crash and start a plain one. Returns the release."""
    assert fleet.rollout is not None
    await fleet.procs.stop(fleet.rollout.proc)
    crashing = await start_rollout(fleet.procs, **{CRASH: at})
    version = await fleet.publish(1)
    await eventually(lambda: _crashed(crashing.proc), timeout=90, interval=0.1,
                     what=f"the rollout service crashing at {at}")  # fmt: skip
    assert crashing.proc.process.returncode == CRASH_EXIT, crashing.proc.output()[-2000:]
    fleet.rollout = await start_rollout(fleet.procs)
    return version


@pytest.mark.fault
async def test_service_killed_between_its_redis_write_and_its_ack(fleet: Fleet) -> None:
    """3. The rollout service applies a cell's upgrade report to Redis and dies before acking it:
    the broker redelivers the report to the next process, which applies it once."""
    cells = await _cells(fleet)
    version = await _crash_the_rollout_service(fleet, f"bus.before-ack:{CellUpgrade.wire_name}")
    await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()


@pytest.mark.fault
@pytest.mark.parametrize("point", ["outbox.before-publish", "outbox.after-publish"])
@pytest.mark.chaos
async def test_service_killed_between_its_state_write_and_the_publish(
    fleet: Fleet, point: str
) -> None:
    """4 and 5. The rollout service writes a step (the desired states it implies go to its
    outbox in the same write) and dies before publishing them, or after publishing and before
    marking them sent: the next process publishes them (again, in the second case: a duplicate
    delivery), and every cell applies the release once."""
    cells = await _cells(fleet)
    version = await _crash_the_rollout_service(fleet, f"{point}:{DesiredState.wire_name}")
    await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()


# Where an agent dies: right after each phase is written to its journal (before it is reported),
# and right after a component is applied.
AGENT_POINTS = (
    "upgrade.phase:accepted", "upgrade.phase:verifying", "upgrade.phase:applying",
    "upgrade.component:server", "upgrade.phase:succeeded",
)  # fmt: skip


@pytest.mark.fault
async def test_agent_killed_at_each_step_of_an_upgrade(fleet: Fleet) -> None:
    """9. Five cells, each agent dying at a different step of the same upgrade; each restarted
    (without the crash point) resumes from its journal: the release applied once per cell and
    exactly one outcome reported per cell."""
    await fleet.tap()
    stages = ("staging", "saas", "dedicated", "dedicated", "dedicated")
    cells = []
    for stage, point in zip(stages, AGENT_POINTS, strict=True):
        cells += await fleet.add(stage, 1, **applier_env(), **{CRASH: point})
    version = await fleet.publish(1)

    restarted: set[str] = set()

    async def all_installed() -> bool:
        for cell in cells:
            if cell.agent.process.returncode is not None and cell.id not in restarted:
                assert cell.agent.process.returncode == CRASH_EXIT, cell.agent.output()[-2000:]
                restarted.add(cell.id)
                cell.env = {k: v for k, v in cell.env.items() if k != CRASH}
                await fleet.start_agent(cell)
        return all([await fleet.installed(c) == version for c in cells])

    await eventually(all_installed, timeout=180, interval=0.3, what="every cell on the release")
    assert restarted == {c.id for c in cells}, "every agent crashed once at its point"
    await fleet.wait_state(version, "completed", timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()

    reports = await fleet.upgrades()
    for cell in cells:
        outcomes = [r.phase for r in reports
                    if r.cell_id == cell.id and r.phase in TERMINAL_PHASES]  # fmt: skip
        assert outcomes == ["succeeded"], (cell.id, outcomes)


@pytest.mark.fault
async def test_rollout_service_killed_mid_bake_counts_each_verdict_once(fleet: Fleet) -> None:
    """The rollout service killed -9 while every cell of a stage bakes a release with health
    checks: the next process takes the verdicts (the broker kept them), counts each cell once,
    and the rollout completes; each agent reported one verdict."""
    await fleet.tap()
    cells = await fleet.add("staging", 2, **applier_env())
    cells += await fleet.add("saas", 1, **applier_env())
    health = '{checks: [{name: up, type: command, command: ["true"]}], bake_seconds: 2}'
    version = await fleet.publish(1, health=health)

    async def staging_baking() -> bool:
        applied = {r.cell_id for r in await fleet.upgrades()
                   if r.phase == "succeeded" and r.verdict is None}  # fmt: skip
        return {c.id for c in cells if c.stage == "staging"} <= applied

    await eventually(staging_baking, timeout=60, interval=0.1, what="staging baking")
    assert fleet.rollout is not None
    fleet.rollout.proc.process.send_signal(signal.SIGKILL)
    await fleet.rollout.proc.process.wait()
    fleet.rollout = await start_rollout(fleet.procs)

    done = await fleet.wait_state(version, "completed", timeout=120)
    assert [done["stages"][s]["updated"] for s in ("staging", "saas")] == [2, 1]
    assert done["stages"]["staging"]["failed"] == done["stages"]["staging"]["in_progress"] == 0
    reports = await fleet.upgrades()
    for cell in cells:
        verdicts = [r.verdict for r in reports if r.cell_id == cell.id and r.verdict is not None]
        assert verdicts == ["healthy"], (cell.id, verdicts)
    Ledger.of([(c.id, c.state) for c in cells], version).check()
