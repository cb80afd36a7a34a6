"""A command for a cell whose queue is missing (RELIABILITY.md 18): detected, not dropped."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import redis.asyncio as aioredis

from common.messages import DesiredState, command_queue
from common.outbox import Outbox
from services.rollout.store import OUTBOX
from testing.fleet import Fleet
from testing.ledger import Ledger, applied, applier_env
from testing.polling import eventually
from testing.processes import http_get


@pytest.mark.fault
async def test_a_command_for_a_cell_whose_queue_is_missing_is_kept_and_counted(
    fleet: Fleet,
) -> None:
    """Someone deletes a cell's command queue; the rollout's desired state for it cannot be
    routed: it is kept in the outbox's unroutable list, counted and logged, never dropped in
    silence. When the agent starts again it finds its queue missing and registers again saying
    so; the queue is declared again, it syncs, and it gets its desired state (kept in the
    rollout's store) once."""
    services = fleet.procs.services
    (cell,) = await fleet.add("staging", 1, **applier_env())
    queue = f"/queues/{quote(services.vhost, safe='')}/{quote(command_queue(cell.id), safe='')}"
    await services.api.call("DELETE", queue)
    version = await fleet.publish(1)

    redis = aioredis.from_url(services.redis_url)
    kept = Outbox(redis, OUTBOX)
    try:
        found = await eventually(kept.unroutable, timeout=60, interval=0.2,
                                 what="the unroutable desired state kept")  # fmt: skip
    finally:
        await redis.aclose()
    assert [m.cell_id for m in found if isinstance(m, DesiredState)] == [cell.id]
    assert fleet.rollout is not None
    _, metrics = await http_get(fleet.rollout.metrics_port, "/metrics")
    counted = f'substrate_outbox_unroutable_commands_total{{type="{DesiredState.wire_name}"}} 1.0'
    assert counted in metrics, [m for m in metrics.splitlines() if "unroutable" in m]
    assert not applied(cell.state)

    # The remedy: the agent starts again (or reconnects), registers, and syncs.
    await fleet.stop_agent(cell)
    await fleet.start_agent(cell)
    await fleet.wait_installed([cell], version, timeout=60)
    assert "is missing; registering again" in cell.agent.output()
    await fleet.wait_state(version, "completed", timeout=60)
    Ledger.of([(cell.id, cell.state)], version).check()
