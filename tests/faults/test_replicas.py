"""Two replicas of a singleton loop (RELIABILITY.md 11): exactly one acts, and a leader that
stalls past its lease (a GC pause, a frozen VM) and wakes up after another took over has its
writes refused by Redis, not by its own belief."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from testing.cells import shown_if
from testing.fleet import Cell, Fleet, write
from testing.ledger import CELLS, Ledger, applied, applier_env
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import Processes, Service, start_registry, start_rollout
from testing.services import Services

LEASE_SECONDS = 3  # start_rollout's SUBSTRATE_LEASE_SECONDS


@pytest.fixture
async def private(machine: Services) -> Services:
    """This module faults processes only: the machine's broker and Redis serve it."""
    return machine


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def _leads(service: Service) -> bool:
    return await service.metric("substrate_rollout_leader") == 1


async def _completed_once_each(fleet: Fleet, cells: list[Cell], version: str) -> None:
    """The rollout completed, every cell applied the release once, and each was assigned one
    generation (no replica's decision reached a cell twice)."""
    await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()
    reports = await fleet.upgrades()
    for cell in cells:
        assert len({r.generation for r in reports if r.cell_id == cell.id}) == 1, reports


async def _start_flags(procs: Processes) -> Service:
    port = free_port()
    proc = await procs.start(f"flags-{port}", "substrate-flags", SUBSTRATE_METRICS_PORT=str(port))
    service = Service(proc, port)
    await eventually(lambda: _answers(service), timeout=30, interval=0.3, what="flags up")
    return service


async def _answers(service: Service) -> bool:
    try:
        await service.metrics()
    except OSError:
        return False
    return True


FLAG = """
key: {key}
owner: team-replicas
description: A flag changed with two replicas of every service
rules:
  - name: everyone
    serve: on
"""


@pytest.mark.fault
async def test_two_replicas_of_every_service_and_one_killed(fleet: Fleet) -> None:
    """Two registries, two rollout services, two flags services: one release and one flag
    change go to every cell once. The rollout replica leading the controller is killed with -9
    mid-rollout; the other takes the lease over and finishes the rollout; every cell is assigned
    one generation and applies the release once, and the flag change is one broadcast."""
    assert fleet.rollout is not None
    await start_registry(fleet.procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="20")
    rollouts = [fleet.rollout, await start_rollout(fleet.procs)]
    flags = [await _start_flags(fleet.procs), await _start_flags(fleet.procs)]
    await fleet.tap()
    env = applier_env(0.5)
    await fleet.add("staging", 1, **env)
    await fleet.add("saas", 1, **env)
    await fleet.add("dedicated", max(CELLS - 2, 1), **env)
    cells = fleet.cells

    version = await fleet.publish(1)
    await eventually(lambda: any(applied(c.state) for c in cells), timeout=60, interval=0.05,
                     what="a first cell applying")  # fmt: skip
    leading = [r for r in rollouts if await _leads(r)]
    assert len(leading) == 1, "exactly one rollout replica leads"
    leader, survivor = leading[0], next(r for r in rollouts if r is not leading[0])
    leader.proc.process.kill()
    killed_at = time.monotonic()
    await eventually(lambda: _leads(survivor), timeout=60, interval=0.1,
                     what="the surviving replica leading")  # fmt: skip
    print(f"the surviving replica led {time.monotonic() - killed_at:.1f}s after the leader was "
          f"killed (lease {LEASE_SECONDS}s)")  # fmt: skip
    fleet.rollout = survivor

    await _completed_once_each(fleet, cells, version)

    key = f"replicas-{fleet.minor}"
    code, result, err = await fleet.procs.ctl(
        "flags", "set", write(fleet.root / "flag.yaml", FLAG.format(key=key))
    )
    assert code == 0 and result["changed"], err

    async def every_cell_has_it() -> bool:
        def on_it(record: dict[str, Any]) -> bool:
            return bool(record.get("flags_snapshot_version") == result["snapshot_version"])

        return all([await shown_if(fleet.procs, c.id, on_it) for c in cells])

    await eventually(every_cell_has_it, timeout=60, interval=0.5,
                     what="every cell on the new flags snapshot")  # fmt: skip
    # One broadcast for the whole fleet, from the replica that took the change.
    pushed = [await f.metric("substrate_flags_snapshots_sent_total", why="change",
                             outcome="sent") for f in flags]  # fmt: skip
    assert sorted(pushed) == [0, 1], f"broadcasts per replica: {pushed}"


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

    # One generation per cell: the stale leader's decision never reached one.
    await _completed_once_each(fleet, cells, version)
    # And, both awake, still exactly one leads.
    assert [await _leads(first), await _leads(second)] == [False, True]
