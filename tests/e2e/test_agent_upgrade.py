"""A real agent process applies a desired state sent to its command queue: it verifies the
images in (moto's) ECR, closes the gate while a maintenance component updates, reports every
phase, and the registry then shows the release installed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cell_agent.maintenance import MESSAGE
from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE, CellUpgrade, DesiredState
from common.releases import Component, Release
from common.topology import Binding, Topology, consuming_queue
from testing.broker import read_all
from testing.cells import create_cell, new_cell_id, show, shown_if, start_agent, status_is
from testing.fleet import push_image
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import Processes, Registry, http_get
from testing.services import Services


async def cell_with_report_tap(procs: Processes, bus: RabbitBus) -> tuple[str, dict[str, Any], str]:
    """A new cell, and a queue that receives a copy of its upgrade reports."""
    cell = new_cell_id()
    created = await create_cell(procs, cell)
    reports = f"test.{cell}.upgrades"
    await bus.declare(
        Topology((), consuming_queue(reports, Binding(CELLS_EXCHANGE, f"{cell}.upgrade")))
    )
    return cell, created, reports


@pytest.mark.e2e
async def test_agent_applies_a_release_with_the_gate_closed_only_meanwhile(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services,
    bus: RabbitBus,
) -> None:  # fmt: skip
    cell, created, reports = await cell_with_report_tap(procs, bus)
    port = free_port()
    marker = tmp_path / "applied.log"
    # The db component takes a moment, so the gate can be seen closed while it updates.
    command = (
        f'if [ "$SUBSTRATE_COMPONENT" = db ]; then sleep 2; fi; '
        f'echo "$SUBSTRATE_COMPONENT $SUBSTRATE_DIGEST" >> {marker}'
    )
    await start_agent(
        procs, moto, cell, created["amqp_url"], tmp_path / "state", metrics_port=port,
        CELL_APPLIER="command", CELL_APPLY_COMMAND=command, CELL_PROGRESS_REPORT_SECONDS="0.5",
    )  # fmt: skip
    await eventually(lambda: status_is(procs, cell, "online"), timeout=20, interval=0.3)
    assert (await http_get(port, "/gate/start"))[0] == 200

    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    release = Release(version="2026.11.1", components=(
        Component(name="server", image=f"{host}/{cell}/server",
                  digest=push_image(moto, f"{cell}/server", "2026.11.1")),
        Component(name="db", image=f"{host}/{cell}/db",
                  digest=push_image(moto, f"{cell}/db", "2026.11.1"), requires_maintenance=True),
    ))  # fmt: skip
    # What the rollout service will send: the full spec with a generation.
    await bus.publish(
        DesiredState(cell_id=cell, issued_at=datetime.now(UTC), generation=1, release=release)
    )

    _, body = await eventually(
        lambda: _gate_closed(port), timeout=20, interval=0.1, what="gate closed during the db"
    )
    assert json.loads(body)["message"] == MESSAGE
    record = await eventually(
        lambda: _installed(procs, cell, "2026.11.1"), timeout=20, interval=0.3
    )
    assert record["applied_generation"] == 1 and record["maintenance"] is False
    # The control plane saw the stay in maintenance: the db component took about 2 s.
    stay = await eventually(lambda: _maintenance_total(procs, cell), timeout=10, interval=0.3)
    assert 1.5 <= stay < 30
    for action in ("start", "stop", "snapshot"):
        assert (await http_get(port, f"/gate/{action}"))[0] == 200
    assert marker.read_text().split("\n")[:2] == [
        f"server {release.components[0].digest}",
        f"db {release.components[1].digest}",
    ]
    phases = [
        (body["generation"], body["phase"])
        for body in (json.loads(m.body) for m in await read_all(services.amqp_url, reports))
        if CellUpgrade.model_validate(body)
    ]
    # A phase is reported once it has lasted 0.5 s: applying (the db's 2 s) always, verifying
    # when ECR's answer took that long, accepted never (it ends as it is made).
    assert phases[-2:] == [(1, "applying"), (1, "succeeded")], phases
    assert set(phases[:-2]) <= {(1, "verifying")}, phases


async def _maintenance_total(procs: Processes, cell: str) -> float | None:
    total = float((await show(procs, cell))["maintenance_seconds_total"])
    return total or None


async def _gate_closed(port: int) -> tuple[int, str] | None:
    status, body = await http_get(port, "/gate/snapshot")
    return (status, body) if status == 503 else None


async def _installed(procs: Processes, cell: str, version: str) -> dict[str, Any] | None:
    return await shown_if(procs, cell, lambda r: r["installed_release"] == version)


@pytest.mark.e2e
async def test_an_agent_killed_while_applying_resumes_and_reports_one_outcome(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services,
    bus: RabbitBus,
) -> None:  # fmt: skip
    cell, created, reports = await cell_with_report_tap(procs, bus)
    port = free_port()
    slow_db = 'if [ "$SUBSTRATE_COMPONENT" = db ]; then sleep 3; fi'
    agent_env = {"CELL_APPLIER": "command", "CELL_APPLY_COMMAND": slow_db}
    state = tmp_path / "state"
    agent = await start_agent(procs, moto, cell, created["amqp_url"], state, metrics_port=port,
                              **agent_env)  # fmt: skip
    await eventually(lambda: status_is(procs, cell, "online"), timeout=20, interval=0.3)
    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    release = Release(version="2026.11.2", components=(
        Component(name="db", image=f"{host}/{cell}/db",
                  digest=push_image(moto, f"{cell}/db", "2026.11.2"), requires_maintenance=True),
    ))  # fmt: skip
    await bus.publish(
        DesiredState(cell_id=cell, issued_at=datetime.now(UTC), generation=1, release=release)
    )
    await eventually(lambda: _gate_closed(port), timeout=20, interval=0.1, what="applying")
    agent.process.kill()  # kill -9 in the middle of the maintenance component
    await agent.process.wait()

    await start_agent(procs, moto, cell, created["amqp_url"], state, metrics_port=port,
                      **agent_env)  # fmt: skip
    record = await eventually(
        lambda: _installed(procs, cell, "2026.11.2"), timeout=30, interval=0.3
    )
    assert record["maintenance"] is False
    assert (await http_get(port, "/gate/start"))[0] == 200
    phases = [json.loads(m.body)["phase"] for m in await read_all(services.amqp_url, reports)]
    outcomes = [p for p in phases if p in ("succeeded", "failed", "rolled_back")]
    assert outcomes == ["succeeded"], phases
