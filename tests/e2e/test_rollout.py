"""Staged rollouts end to end: the registry, the rollout service and real agent processes, with
images in (moto's) ECR and soak times of a second."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from common.messages import EVENTS_EXCHANGE, RolloutProgressed
from common.topology import Binding, Topology, consuming_queue
from testing.broker import read_all
from testing.cells import status_is
from testing.fleet import POLICY, Fleet
from testing.ledger import applier_env
from testing.polling import eventually
from testing.processes import Processes, start_rollout


@pytest.mark.e2e
async def test_a_release_goes_through_every_stage_and_a_new_cell_gets_it_first(
    fleet: Fleet,
) -> None:
    await fleet.add("staging")
    await fleet.add("saas")
    await fleet.add("dedicated", 3)
    # Every step the controller takes is an event: kept in a queue of the test's own, so that
    # seeing a 1 s soak does not depend on polling faster than it lasts.
    steps = f"{fleet.reports}.steps"
    await fleet.bus.declare(Topology((), consuming_queue(
        steps, Binding(EVENTS_EXCHANGE, RolloutProgressed.event_key))))  # fmt: skip
    version = await fleet.publish(1)

    await fleet.wait_state(version, "completed", timeout=90)
    events = [RolloutProgressed.model_validate_json(m.body)
              for m in await read_all(fleet.procs.services.amqp_url, steps)]  # fmt: skip
    seen: list[tuple[str, str, int | None]] = []
    for e in events:
        if e.version == version and e.stage is not None:
            step = (e.state, e.stage, None if e.wave is None else e.wave + 1)
            if not seen or seen[-1] != step:
                seen.append(step)
    await fleet.wait_installed(fleet.cells, version)
    final = await fleet.status(version)
    assert final["stages"]["dedicated"]["updated"] == 3
    assert final["stages"]["staging"] == {**final["stages"]["staging"], "total": 1, "updated": 1}
    # Each step showed in `rollout status`: the stages in order, soaks between them, and
    # dedicated's three waves (a canary and two more: 10% and 50% of two cells round up).
    stages = [s for _, s, _ in seen]
    assert stages == sorted(stages, key=["staging", "saas", "dedicated"].index)
    assert ("soaking", "staging", 1) in seen and ("soaking", "saas", 1) in seen
    assert {w for state, s, w in seen if s == "dedicated" and state == "in_progress"} <= {1, 2, 3}
    assert ("soaking", "dedicated", 1) in seen and ("soaking", "dedicated", 2) in seen
    assert seen[-1][0] == "completed"
    # The order the cells got it in: staging first, then saas, then dedicated one by one.
    reports = [r for r in await fleet.upgrades() if r.phase == "succeeded"]
    order = [next(c.stage for c in fleet.cells if c.id == r.cell_id) for r in reports]
    assert order == ["staging", "saas", "dedicated", "dedicated", "dedicated"]

    [late] = await fleet.add("dedicated")
    await fleet.wait_installed([late], version)
    assert (await fleet.explain(late))["reason"] == "up_to_date"


@pytest.mark.e2e
async def test_a_release_with_a_missing_image_fails_in_staging_and_goes_no_further(
    fleet: Fleet,
) -> None:
    await fleet.add("staging")
    await fleet.add("saas")
    await fleet.add("dedicated", 2)
    good = await fleet.publish(1)
    await fleet.wait_state(good, "completed")
    bad = await fleet.publish(2, missing_image=True)
    halted = await fleet.wait_state(bad, "halted")
    assert halted["stage"] == "staging"
    [failure] = halted["halt"]["failures"]
    assert failure["cell_id"] == fleet.of("staging")[0].id
    assert "images not found" in failure["error"]
    assert halted["stages"]["staging"]["failed"] == 1
    # Nothing past staging was sent the release, and every cell still runs the good one.
    sent_bad = {r.cell_id for r in await fleet.upgrades() if r.release_version == bad}
    assert sent_bad == {fleet.of("staging")[0].id}
    await fleet.wait_installed(fleet.cells, good)
    explained = await fleet.explain(fleet.of("dedicated")[0])
    assert explained["reason"] == "halted" and bad in explained["explanation"]


@pytest.mark.e2e
async def test_a_release_failing_on_dedicated_halts_after_the_canary_then_resume_and_abort(
    fleet: Fleet, tmp_path: Path
) -> None:
    bad_patch = 2
    # Dedicated cells cannot run the bad release: their applier refuses it (the rollback to the
    # previous release works).
    refuse = f'test "$SUBSTRATE_RELEASE" != "{fleet.version(bad_patch)}"'
    await fleet.add("staging")
    await fleet.add("saas")
    dedicated = await fleet.add("dedicated", 4, CELL_APPLIER="command", CELL_APPLY_COMMAND=refuse)
    good = await fleet.publish(1)
    await fleet.wait_state(good, "completed")
    bad = await fleet.publish(bad_patch)
    halted = await fleet.wait_state(bad, "halted")
    assert (halted["stage"], halted["wave"]) == ("dedicated", 1)
    assert "canary" in halted["halt"]["reason"]
    got_bad = {r.cell_id for r in await fleet.upgrades() if r.release_version == bad}
    dedicated_ids = {c.id for c in dedicated}
    assert len(got_bad & dedicated_ids) == 1, "exactly one dedicated cell got it"
    [canary] = [c for c in dedicated if c.id in got_bad]
    outcome = [r for r in await fleet.upgrades() if r.cell_id == canary.id
               and r.release_version == bad and r.phase in ("rolled_back", "failed")]  # fmt: skip
    assert [r.phase for r in outcome] == ["rolled_back"]
    await fleet.wait_installed(dedicated, good)
    assert (await fleet.explain(canary))["reason"] == "failed"

    # Resume accepts the canary's failure and goes on: the next wave gets it, fails, halts.
    code, resumed, err = await fleet.procs.ctl("rollout", "resume", bad)
    assert code == 0 and resumed["state"] == "in_progress", err
    halted = await fleet.wait_state(bad, "halted")
    assert halted["wave"] == 2
    got_bad = {r.cell_id for r in await fleet.upgrades() if r.release_version == bad}
    assert len(got_bad & dedicated_ids) == 2

    # Abort ends it: nothing more is sent, and every cell is on the good release.
    code, aborted, err = await fleet.procs.ctl("rollout", "abort", bad, "--yes")
    assert code == 0 and aborted["state"] == "aborted", err
    code, _, err = await fleet.procs.ctl("rollout", "resume", bad)
    assert code == 1 and "aborted" in err
    await fleet.wait_installed(fleet.cells, good)
    assert (await fleet.status(bad))["state"] == "aborted"

    # What Prometheus sees: two halts in dedicated, the canary's and the next wave's rolled-back
    # upgrades timed, and every cell counted on the good release.
    assert fleet.rollout is not None
    metric = fleet.rollout.metric
    assert await metric("substrate_rollout_halts_total", stage="dedicated") == 2
    assert await metric("substrate_upgrade_duration_seconds_count", outcome="rolled_back") == 2
    assert await metric("substrate_rollouts_halted") == 0
    assert await metric("substrate_rollout_cells", stage="dedicated", release=good) == 4
    assert await metric("substrate_rollout_state", version=bad, state="aborted",
                        stage="dedicated") == 1  # fmt: skip


@pytest.mark.e2e
async def test_abort_sends_a_reversible_release_s_cells_back(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.add("staging")
    await fleet.add("saas")
    await fleet.add("dedicated", 2)
    good = await fleet.publish(1)
    await fleet.wait_state(good, "completed")
    (tmp_path / "slow.yaml").write_text("soak_seconds: {staging: 0, saas: 0, dedicated: 600}\n")
    code, _, err = await fleet.procs.ctl("rollout", "policy", "set", str(tmp_path / "slow.yaml"))
    assert code == 0, err
    newer = await fleet.publish(2)
    soaking = await fleet.wait_state(newer, "soaking")
    assert soaking["stage"] == "dedicated" and soaking["stages"]["dedicated"]["updated"] == 1
    code, _, err = await fleet.procs.ctl("rollout", "abort", newer, "--yes")
    assert code == 0, err
    await fleet.wait_installed(fleet.cells, good)
    back = [r for r in await fleet.upgrades() if r.release_version == good]
    assert len({r.cell_id for r in back if r.phase == "succeeded"}) == len(fleet.cells)


@pytest.mark.e2e
async def test_a_newer_release_supersedes_an_older_one_and_no_cell_goes_backwards(
    fleet: Fleet, tmp_path: Path
) -> None:
    await fleet.add("staging")
    await fleet.add("saas")
    await fleet.add("dedicated", 3)
    (tmp_path / "slow.yaml").write_text("soak_seconds: {staging: 0, saas: 0, dedicated: 600}\n")
    code, _, err = await fleet.procs.ctl("rollout", "policy", "set", str(tmp_path / "slow.yaml"))
    assert code == 0, err
    older = await fleet.publish(1)
    await fleet.wait_state(older, "soaking")  # after dedicated's canary
    (tmp_path / "quick.yaml").write_text(POLICY)
    code, _, err = await fleet.procs.ctl("rollout", "policy", "set", str(tmp_path / "quick.yaml"))
    newer = await fleet.publish(2)
    await fleet.wait_state(newer, "completed")
    assert (await fleet.status(older))["state"] == "superseded"
    await fleet.wait_installed(fleet.cells, newer)
    for cell in fleet.cells:
        versions = [r.release_version for r in await fleet.upgrades()
                    if r.cell_id == cell.id and r.phase == "succeeded"]  # fmt: skip
        assert versions in ([older, newer], [newer]), (cell.id, versions)


@pytest.mark.e2e
async def test_an_offline_cell_is_updated_when_it_returns_and_a_restarted_service_continues(
    fleet: Fleet, procs: Processes
) -> None:
    await fleet.add("staging")
    await fleet.add("saas")
    dedicated = await fleet.add("dedicated", 3)
    away = dedicated[0]
    await fleet.stop_agent(away)
    await eventually(lambda: status_is(procs, away.id, "offline"), timeout=20, interval=0.3)
    version = await fleet.publish(1)
    # Kill the rollout service mid-rollout; a new one carries on from Redis.
    await fleet.wait_state(version, "soaking")
    [service] = [p for p in procs.running if p.name.startswith("rollout-")]
    os.kill(service.process.pid, signal.SIGKILL)
    await service.process.wait()
    await start_rollout(procs)
    done = await fleet.wait_state(version, "completed")
    assert done["stages"]["dedicated"]["offline"] == 1
    assert (await fleet.explain(away))["reason"] == "offline"
    # Every cell was sent the release once: one generation each, whatever the restart did.
    reports = await fleet.upgrades()
    per_cell = {c.id: {r.generation for r in reports if r.cell_id == c.id} for c in fleet.cells}
    assert all(len(g) == 1 for cid, g in per_cell.items() if cid != away.id), per_cell
    assert per_cell[away.id] == set()

    await fleet.start_agent(away)
    await fleet.wait_installed([away], version)
    assert (await fleet.explain(away))["reason"] == "up_to_date"


@pytest.mark.e2e
async def test_pinned_cells_stay_and_bad_operator_input_is_refused(
    fleet: Fleet, tmp_path: Path
) -> None:
    [pinned, free] = await fleet.add("staging", 2)
    first = await fleet.publish(1)
    await fleet.wait_installed([pinned, free], first)
    code, result, err = await fleet.procs.ctl("cells", "pin", pinned.id, first)
    assert code == 0 and result["pinned"] == first, err
    second = await fleet.publish(2)
    await fleet.wait_installed([free], second)
    assert await fleet.installed(pinned) == first
    explained = await fleet.explain(pinned)
    assert explained["reason"] == "pinned" and first in explained["explanation"]
    code, _, err = await fleet.procs.ctl("cells", "pin", free.id, first)
    assert code == 1 and "never goes backwards" in err
    code, _, err = await fleet.procs.ctl("cells", "unpin", pinned.id)
    assert code == 0, err
    await fleet.wait_installed([pinned], second)

    (tmp_path / "bad.yaml").write_text("waves: {canary: 1, fractions: [0.5, 0.2]}\nsoak: 3\n")
    code, _, err = await fleet.procs.ctl("rollout", "policy", "set", str(tmp_path / "bad.yaml"))
    assert code == 1 and "waves.fractions" in err and "soak: Extra inputs" in err, err
    code, shown, _ = await fleet.procs.ctl("rollout", "policy", "show")
    assert shown["soak_seconds"]["staging"] == 1, "the policy is unchanged"
    code, _, err = await fleet.procs.ctl("rollout", "pause", "9.9.9")
    assert code == 1 and "not published" in err
    code, _, err = await fleet.procs.ctl("rollout", "explain", "nope-cell")
    assert code == 1 and "no cell" in err
    code, _, err = await fleet.procs.ctl("rollout", "pause", second)
    assert code == 1 and "completed" in err


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.e2e
async def test_rollout_watch_follows_a_rollout_to_its_end(fleet: Fleet, procs: Processes) -> None:
    """`rollout watch --json` prints a line at each change until the rollout completes. Each
    cell takes seconds to apply the release, so the rollout is still in its stages when the
    command has started, however long a loaded machine takes to start it."""
    await fleet.add("staging", 1, **applier_env(apply_seconds=2))
    await fleet.add("dedicated", 2, **applier_env(apply_seconds=3))
    version = await fleet.publish(1)
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "substratectl"), "--json", "rollout", "watch", version,
        "--interval", "0.2", env=procs.env(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0
    frames = _json_lines(out.decode())
    assert frames[-1]["state"] == "completed"
    assert len(frames) >= 3 and frames[0]["version"] == version
