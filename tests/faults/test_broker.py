"""Faults of the broker (RELIABILITY.md 1, 2 and 17), on a private RabbitMQ node: killed with -9
in the middle of a rollout, restarted gracefully, and out of memory. Each ends with the ledger."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from common.bus.errors import NotConnected, PublishTimeout
from common.bus.rabbit_bus import RabbitBus
from testing.broker import cell_queue
from testing.cells import heartbeat, new_cell_id
from testing.fleet import Fleet
from testing.ledger import CELLS, Ledger, applied, applier_env
from testing.nodes import PrivateRabbit
from testing.polling import eventually
from testing.services import Services


async def _grow(fleet: Fleet, apply_seconds: float) -> None:
    env = applier_env(apply_seconds)
    await fleet.add("staging", 1, **env)
    await fleet.add("saas", 1, **env)
    await fleet.add("dedicated", max(CELLS - 2, 1), **env)


def _ledger(fleet: Fleet, version: str) -> Ledger:
    return Ledger.of([(c.id, c.state) for c in fleet.cells], version)


@pytest.mark.fault
async def test_broker_killed_mid_rollout(fleet: Fleet, rabbit: PrivateRabbit) -> None:
    """1. kill -9 of the broker while cells are applying; restarted on the same data. Every cell
    ends on the release, each applied once; no process of ours is restarted."""
    await _grow(fleet, apply_seconds=0.5)
    version = await fleet.publish(1)

    await eventually(lambda: any(applied(c.state) for c in fleet.cells), timeout=60,
                     interval=0.05, what="a first cell applying")  # fmt: skip
    await rabbit.kill()
    await rabbit.start()

    await fleet.wait_state(version, "completed", timeout=240)
    await fleet.wait_installed(fleet.cells, version, timeout=60)
    _ledger(fleet, version).check()
    assert all(p.process.returncode is None for p in fleet.procs.running)


@pytest.mark.fault
@pytest.mark.chaos
async def test_broker_restarted_gracefully(fleet: Fleet, rabbit: PrivateRabbit) -> None:
    """2. A graceful restart: every agent and service is back on its own (no process restarted),
    heartbeating, and a release published after it reaches every cell once."""
    await _grow(fleet, apply_seconds=0)
    await rabbit.restart(graceful=True)
    restarted = datetime.now(UTC)

    async def heartbeating_again() -> bool:
        code, cells, _ = await fleet.procs.ctl("cells", "list")
        return code == 0 and all(
            c["status"] == "online" and c["last_heartbeat_at"]
            and datetime.fromisoformat(c["last_heartbeat_at"]) > restarted
            for c in cells
        ) and len(cells) == len(fleet.cells)  # fmt: skip

    await eventually(heartbeating_again, timeout=60, interval=0.5,
                     what="every cell heartbeating after the restart")  # fmt: skip
    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed", timeout=120)
    _ledger(fleet, version).check()
    assert all(p.process.returncode is None for p in fleet.procs.running)


@pytest.mark.fault
async def test_broker_memory_alarm(private: Services, rabbit: PrivateRabbit) -> None:
    """17. Under a memory alarm the broker blocks publishers: a publish times out visibly (no
    hang), and publishing works again once the alarm clears; the confirmed messages are there.
    A publish given a longer confirm timeout (the flags broadcast's) waits the alarm out."""
    bus = await RabbitBus.connect(private.amqp_url, name="fault-alarm", publish_timeout=1.0)
    patient: asyncio.Task[None] | None = None
    try:
        cell = new_cell_id()
        queue = await cell_queue(bus, cell)
        await bus.publish(heartbeat(cell, seq=1))
        before = await rabbit.ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
        try:
            await rabbit.ctl("set_vm_memory_high_watermark", "0.000001")
            with pytest.raises(PublishTimeout, match="memory or disk alarm"):
                await bus.publish(heartbeat(cell, seq=2))
            patient = asyncio.create_task(bus.publish(heartbeat(cell, seq=4), confirm_timeout=60))
            # Past the bus's own timeout (which fires by 1.25 s), it is still waiting.
            await asyncio.wait({patient}, timeout=2.5)
            assert not patient.done(), patient
        finally:
            await rabbit.ctl("set_vm_memory_high_watermark", before)
        assert patient is not None
        await asyncio.wait_for(patient, 30)  # confirmed once the alarm cleared

        async def publishes() -> bool:
            try:
                await bus.publish(heartbeat(cell, seq=3))
            except (PublishTimeout, NotConnected):
                return False
            return True

        await eventually(publishes, timeout=30, interval=0.5, what="publishing after the alarm")
        # Confirmed: 1, 3 and 4 (and 2, if the broker took it after the alarm cleared).
        assert (await bus.queue_state(queue)).messages >= 3
    finally:
        if patient is not None and not patient.done():
            patient.cancel()
        await bus.close(drain_timeout=1)


@pytest.mark.fault
async def test_broker_killed_while_cells_bake(fleet: Fleet, rabbit: PrivateRabbit) -> None:
    """kill -9 of the broker while cells bake a release with health checks: the verdicts made
    meanwhile wait in the agents' outboxes, and once the broker is back each cell is counted
    healthy once and the rollout completes."""
    await fleet.add("staging", 1, **applier_env())
    await fleet.add("dedicated", 1, **applier_env())
    health = '{checks: [{name: up, type: command, command: ["true"]}], bake_seconds: 2}'
    version = await fleet.publish(1, health=health)

    # Killed once the staging cell has applied it: its bake, and its verdict, come meanwhile.
    await eventually(lambda: applied(fleet.cells[0].state), timeout=60, interval=0.05,
                     what="the staging cell applied")  # fmt: skip
    await rabbit.kill()
    await rabbit.start()

    done = await fleet.wait_state(version, "completed", timeout=240)
    counts = [done["stages"][stage] for stage in ("staging", "dedicated")]
    assert sum(c["updated"] for c in counts) == len(fleet.cells)
    assert sum(c["failed"] + c["inconclusive"] + c["in_progress"] for c in counts) == 0
    await fleet.wait_installed(fleet.cells, version, timeout=60)
    _ledger(fleet, version).check()
