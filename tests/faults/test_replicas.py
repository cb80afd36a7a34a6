"""Two replicas of a singleton loop (RELIABILITY.md 11): exactly one acts, and a leader that
stalls past its lease (a GC pause, a frozen VM) and wakes up after another took over has its
writes refused by Redis, not by its own belief."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Service
from tests.e2e.test_rollout import Fleet, start_rollout
from tests.faults.ledger import Ledger, applier_env
from tests.helpers import eventually

LEASE_SECONDS = 3  # start_rollout's SUBSTRATE_LEASE_SECONDS


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def _leads(service: Service) -> bool:
    return await service.metric("substrate_rollout_leader") == 1


@pytest.mark.fault
@pytest.mark.chaos
async def test_two_replicas_of_the_controller_and_a_stale_leader(fleet: Fleet) -> None:
    await fleet.tap()
    cells = await fleet.add("staging", 1, **applier_env())
    cells += await fleet.add("dedicated", 2, **applier_env())
    assert fleet.rollout is not None
    await fleet.procs.stop(fleet.rollout.proc)
    # The first replica stops itself when it is about to write its first step that sends
    # desired states: it has taken a fence and a generation, and decided.
    first = await start_rollout(fleet.procs, SUBSTRATE_PAUSE_AT="controller.before-commit:assign")
    await eventually(lambda: _leads(first), timeout=30, interval=0.2, what="the first leading")
    second = await start_rollout(fleet.procs)
    fleet.rollout = second
    assert not await _leads(second), "two replicas lead at once"

    pid = first.proc.process.pid
    try:
        version = await fleet.publish(1)
        await eventually(lambda: _stopped(pid), timeout=60, interval=0.1,
                         what="the leader frozen before its write")  # fmt: skip
        frozen_at = time.monotonic()
        # No substratectl meanwhile: a request the frozen replica took would wait for it.
        await eventually(lambda: _leads(second), timeout=60, interval=0.1,
                         what="the second replica taking the lease")  # fmt: skip
        took_over = time.monotonic() - frozen_at
    finally:
        os.kill(pid, signal.SIGCONT)
    # Awake, the stale leader writes the step it decided, with the fence it held: refused.
    await eventually(
        lambda: first.metric("substrate_rollout_fence_lost_total"), timeout=30, interval=0.2,
        what="the stale leader's write refused",
    )  # fmt: skip
    assert not await _leads(first)
    print(f"the second replica led {took_over:.1f}s after the first froze "
          f"(lease {LEASE_SECONDS}s)")  # fmt: skip

    await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()
    # One generation per cell: the stale leader's decision never reached one.
    accepted = [r for r in await fleet.upgrades() if r.phase == "accepted"]
    for cell in cells:
        assert len({r.generation for r in accepted if r.cell_id == cell.id}) == 1, accepted
    # And, both awake, still exactly one leads.
    assert [await _leads(first), await _leads(second)] == [False, True]
