"""What holds a release at a cell's door, with real agents: the two-person rule before
dedicated, and maintenance windows (opened by moving the rollout service's clock)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from common.bus.rabbit_bus import RabbitBus
from testing.fleet import POLICY, Fleet, forget_rollouts, quick_fleet, write
from testing.operators import add_operator
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services


@pytest.fixture
async def clock_fleet(
    procs: Processes, services: Services, moto: str, tmp_path: Path, bus: RabbitBus
) -> AsyncIterator[tuple[Fleet, Path]]:
    """The conftest's fleet, its rollout service's wall clock moved by a skew file."""
    await forget_rollouts(services)
    await start_registry(procs)
    skew = tmp_path / "rollout.skew"
    skew.write_text("0")
    f = await quick_fleet(procs, moto, tmp_path, bus, SUBSTRATE_CLOCK_SKEW_FILE=str(skew))
    await f.tap()
    yield f, skew


async def _set(procs: Processes, path: Path, text: str, *args: str) -> None:
    code, _, err = await procs.ctl(*args, write(path, text))
    assert code == 0, err


@pytest.mark.e2e
async def test_a_release_waits_for_a_second_operator_before_dedicated(
    fleet: Fleet, tmp_path: Path
) -> None:
    procs = fleet.procs
    policy = POLICY + "approval_stages: [dedicated]\n"
    await _set(procs, tmp_path / "p.yaml", policy, "rollout", "policy", "set")
    staging = await fleet.add("staging")
    dedicated = await fleet.add("dedicated")
    carol = await add_operator(procs, f"carol-{uuid.uuid4().hex[:6]}", "operator")
    version = await fleet.publish(1)

    async def waits() -> dict[str, Any] | None:
        status = await fleet.status(version)
        return status if "waits for approval" in (status["waiting"] or "") else None

    status = await eventually(waits, timeout=60, interval=0.3, what="waiting for approval")
    assert status["stage"] == "dedicated" and status["published_by"] == "guest"
    assert "asked by guest" in status["waiting"]
    await fleet.wait_installed(staging, version)
    assert await fleet.installed(dedicated[0]) is None
    said = await fleet.explain(dedicated[0])
    assert said["reason"] == "waiting_for_approval" and "asked by guest" in said["explanation"]
    code, text, _ = await procs.ctl_text("rollout", "status", version)
    assert "waits for approval to enter dedicated (asked by guest)" in text

    # Its publisher may not approve it; a second operator does.
    code, _, err = await procs.ctl("rollout", "approve", version)
    assert code == 1 and "guest published" in err and "another operator" in err
    code, _, err = await procs.ctl("rollout", "approve", version, **carol)
    assert code == 0, err
    await fleet.wait_state(version, "completed")
    await fleet.wait_installed(dedicated, version)
    status = await fleet.status(version)
    user = carol["SUBSTRATE_AMQP_URL"].split("//")[1].split(":")[0]
    assert status["approved"] == {"dedicated": user} and status["waiting"] is None


@pytest.mark.e2e
async def test_a_cell_outside_its_window_waits_for_it_while_one_inside_updates(
    clock_fleet: tuple[Fleet, Path], tmp_path: Path
) -> None:
    fleet, skew = clock_fleet
    procs = fleet.procs
    inside, outside = await fleet.add("staging", 2)
    now = datetime.now(UTC)
    opens = (now + timedelta(hours=2)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = opens.strftime("%a").lower()
    # Open now (an hour from 10 minutes ago), and one that opens in about two hours.
    started = now - timedelta(minutes=10)
    await _set(procs, tmp_path / "in.yaml",
               f"time_zone: UTC\nwindows:\n  - days: [{started.strftime('%a').lower()}]\n"
               f"    start: \"{started:%H:%M}\"\n    duration_minutes: 60\n",
               "windows", "set", "--cell", inside.id)  # fmt: skip
    await _set(procs, tmp_path / "out.yaml",
               f"time_zone: UTC\nwindows:\n  - days: [{day}]\n    start: \"{opens:%H:%M}\"\n"
               "    duration_minutes: 60\n",
               "windows", "set", "--cell", outside.id)  # fmt: skip
    code, listed, _ = await procs.ctl("windows", "list")
    mine = {e["owner"]: e for e in listed}
    assert mine[f"cell:{inside.id}"]["open_now"] and not mine[f"cell:{outside.id}"]["open_now"]

    version = await fleet.publish(1, maintenance=True)
    await fleet.wait_installed([inside], version)
    code, planned, _ = await procs.ctl("rollout", "plan", version)
    assert planned["not_before"] == {outside.id: opens.isoformat()}
    assert planned["predicted"] == {outside.id: opens.isoformat()}
    said = await fleet.explain(outside)
    assert said["reason"] == "waiting_for_window"
    assert f"waits for its window at {opens.isoformat()}" in said["explanation"]
    assert (await fleet.status(version))["state"] == "in_progress"
    assert await fleet.installed(outside) is None

    # The rollout service's clock reaches the window: the cell is updated, the rollout ends.
    skew.write_text(str((opens - datetime.now(UTC)).total_seconds() + 30))
    await fleet.wait_installed([outside], version, timeout=60)
    await fleet.wait_state(version, "completed")

    code, _, err = await procs.ctl("windows", "set", "--cell", outside.id,
                                   str(_bad(tmp_path)))  # fmt: skip
    assert code == 1 and "time_zone" in err and "not a time zone" in err
    code, listed, _ = await procs.ctl("windows", "list")
    assert {e["owner"]: e["windows"]["time_zone"] for e in listed}[f"cell:{outside.id}"] == "UTC"


def _bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "time_zone: Europe/Atlantis\nwindows:\n"
        '  - days: [mon]\n    start: "01:00"\n    duration_minutes: 30\n'
    )
    return path


async def _defer(cell_state: Path, *args: str) -> tuple[int, str, str]:
    """``cell-agent defer ARGS`` as the customer runs it: the state directory alone."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cell_agent", "defer", *args,
        env={"PATH": os.environ["PATH"], "CELL_STATE_DIR": str(cell_state)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.e2e
async def test_a_customer_defers_within_the_budget_and_a_security_deadline_overrides_it(
    fleet: Fleet,
) -> None:
    procs = fleet.procs
    staging = await fleet.add("staging")
    (dedicated,) = await fleet.add("dedicated")
    code, out, err = await _defer(dedicated.state, "--until", "30d", "--reason", "quarter end")
    assert code == 1 and "past the vendor's budget of 7 days" in err, (out, err)
    code, out, err = await _defer(dedicated.state, "--until", "3d", "--reason", "quarter end")
    assert code == 0 and "deferred until" in out, err

    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed")
    await fleet.wait_installed(staging, version)
    assert await fleet.installed(dedicated) is None
    status = await fleet.status(version)
    assert list(status["deferred"]) == [dedicated.id]
    said = await fleet.explain(dedicated)
    assert said["reason"] == "deferred" and "quarter end" in said["explanation"]

    # A security release with a deadline a few seconds away goes through the deferral then.
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    urgent = await fleet.publish(2, security=True, deadline=deadline.isoformat())
    await fleet.wait_installed([dedicated], urgent, timeout=60)
    assert datetime.now(UTC) >= deadline
    # Both sides audited it: the control plane's log, and the cell's own.
    code, out, err = await procs.ctl("audit", "--cell", dedicated.id, "--service", "rollout")
    assert code == 0, err
    defer = [(e["method"], e["result"]) for e in out["entries"] if e["service"] == "rollout"]
    assert defer == [("cell.defer", "refused"), ("cell.defer", "ok")]
    log = (dedicated.state / "deferral" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in log] == ["request", "answer"] * 2
