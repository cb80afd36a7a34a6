"""Staged rollouts end to end: the registry, the rollout service and real agent processes, with
images in (moto's) ECR and soak times of a second."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common.bus.rabbit_bus import RabbitBus
from common.messages import EVENTS_EXCHANGE, RolloutProgressed
from common.topology import SERVICE_QUEUES, Binding, Topology, consuming_queue
from testing.broker import read_all
from testing.cells import status_is
from testing.fleet import POLICY, Fleet, hide_image, quick_fleet, restore_image
from testing.ledger import applier_env
from testing.polling import eventually
from testing.processes import Processes, start_registry, start_rollout
from testing.services import Services


@pytest.fixture
async def fleet(
    procs: Processes, services: Services, moto: str, tmp_path: Path, bus: RabbitBus
) -> AsyncIterator[Fleet]:
    """A registry and a rollout service that know only this test's cells and releases: the
    session's earlier cells and releases are forgotten by rollout (its keys and queues)."""
    redis = aioredis.from_url(services.redis_url)
    keys = [k async for k in redis.scan_iter("rollout:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
    for queue in SERVICE_QUEUES["rollout"]:
        await services.api.call("DELETE", f"/queues/{services.vhost}/{queue.name}/contents")
    await start_registry(procs)
    f = await quick_fleet(procs, moto, tmp_path, bus)
    await f.tap()
    yield f


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
    code, aborted, err = await fleet.procs.ctl("rollout", "abort", bad)
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
    code, _, err = await fleet.procs.ctl("rollout", "abort", newer)
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


# A check that fails where the cell's state directory holds a file named "unhealthy": the
# release applies everywhere, and hurts only where that file is.
HEALTH = (
    "{checks: [{name: no-unhealthy-file, type: command, command: [sh, -c,"
    " 'test ! -e \"$CELL_STATE_DIR/unhealthy\"']}], bake_seconds: 1}"
)


@pytest.mark.e2e
async def test_a_release_unhealthy_on_dedicated_stops_at_the_canary_which_rolls_back(
    fleet: Fleet,
) -> None:
    await fleet.add("staging")
    await fleet.add("saas")
    dedicated = await fleet.add("dedicated", 3)
    good = await fleet.publish(1)
    await fleet.wait_state(good, "completed", timeout=90)
    for cell in dedicated:
        (cell.state / "unhealthy").write_text("")
    bad = await fleet.publish(2, health=HEALTH)

    halted = await fleet.wait_state(bad, "halted", timeout=90)
    assert (halted["stage"], halted["wave"]) == ("dedicated", 1)
    [failure] = halted["halt"]["failures"]
    canary = next(c for c in dedicated if c.id == failure["cell_id"])
    evidence = "unhealthy: check no-unhealthy-file: exit code 1, wants 0"
    assert failure["error"] == evidence
    assert "canary" in halted["halt"]["reason"] and evidence in halted["halt"]["reason"]
    # Exactly the canary got it, and went back by itself; staging and saas stay on it.
    got_bad = {r.cell_id for r in await fleet.upgrades() if r.release_version == bad}
    assert got_bad & {c.id for c in dedicated} == {canary.id}
    verdicts = [(r.phase, r.verdict) for r in await fleet.upgrades()
                if r.cell_id == canary.id and r.verdict is not None]  # fmt: skip
    assert verdicts == [("rolled_back", "unhealthy")]
    await fleet.wait_installed(dedicated, good)
    await fleet.wait_installed(fleet.of("staging") + fleet.of("saas"), bad)
    assert halted["stages"]["saas"]["updated"] == 1 and halted["stages"]["dedicated"]["failed"] == 1
    explained = await fleet.explain(canary)
    assert explained["reason"] == "failed" and evidence in explained["explanation"]
    code, text, _ = await fleet.procs.ctl_text("rollout", "status", bad)
    assert code == 0 and f"{canary.id}: {evidence}" in text
    assert fleet.rollout is not None
    # The customer's view, from the state directory alone (no broker URL in the environment).
    agent_state = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cell_agent", "state", stdout=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"], "CELL_STATE_DIR": str(canary.state)},
    )  # fmt: skip
    out, _ = await agent_state.communicate()
    assert agent_state.returncode == 0
    shown = json.loads(out)
    assert shown["installed_release"] == good and shown["connected"] is True
    assert shown["last_upgrade"]["outcome"] == "rolled_back"
    assert (shown["last_upgrade"]["verdict"], shown["last_upgrade"]["check"]) == (
        "unhealthy", "no-unhealthy-file",
    )  # fmt: skip
    assert "flags_snapshot_version" in shown and "password" not in out.decode()
    halts = await fleet.rollout.metric(
        "substrate_rollout_halted_release", version=bad, stage="dedicated"
    )
    assert halts == 1


@pytest.mark.e2e
async def test_a_re_bootstrapped_cell_shows_its_failed_install_then_converges(
    fleet: Fleet, moto: str
) -> None:
    (fleet.root / "retry.yaml").write_text(POLICY + "retry_failed_seconds: 2\n")
    code, _, err = await fleet.procs.ctl("rollout", "policy", "set", str(fleet.root / "retry.yaml"))
    assert code == 0, err
    [cell] = await fleet.add("staging")
    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed", timeout=60)
    await fleet.wait_installed([cell], version)

    # The cell is bootstrapped again (an empty state directory: a new incarnation) while its
    # release's image is gone from the registry (as after a fresh demo ECR).
    await fleet.stop_agent(cell)
    shutil.rmtree(cell.state)
    manifest = hide_image(moto, "substrate/server", version)
    await fleet.start_agent(cell)

    async def failed() -> dict[str, Any] | None:
        status = await fleet.status(version)
        return status if status["stages"]["staging"]["failed"] == 1 else None

    status = await eventually(failed, timeout=60, interval=0.3, what="the failure shown")
    assert status["stages"]["staging"]["updated"] == 0
    explained = await fleet.explain(cell)
    assert explained["reason"] == "failed" and "images not found" in explained["explanation"]
    assert "images not found" in cell.agent.log.read_text()

    restore_image(moto, "substrate/server", version, manifest)

    async def updated() -> bool:
        return bool((await fleet.status(version))["stages"]["staging"]["updated"] == 1)

    await eventually(updated, timeout=60, interval=0.3, what="converged to updated")
    await fleet.wait_installed([cell], version)
    assert (await fleet.explain(cell))["reason"] == "up_to_date"


@pytest.mark.e2e
async def test_a_cell_back_from_two_releases_behind_walks_the_required_one_first(
    fleet: Fleet,
) -> None:
    healthy = '{checks: [{name: agent-up, type: command, command: ["true"]}], bake_seconds: 0}'
    [on_time, away] = await fleet.add("staging", 2)
    await fleet.stop_agent(away)
    await eventually(
        partial(status_is, fleet.procs, away.id, "offline"), timeout=30, interval=0.3,
        what="the cell offline",
    )  # fmt: skip
    required = await fleet.publish(1, required=True, health=healthy)
    await fleet.wait_state(required, "completed", timeout=60)
    newest = await fleet.publish(2, health=healthy)
    await fleet.wait_state(newest, "completed", timeout=60)
    # The plan of a third shows the returning cell's path, before anything is published.
    preview = fleet.root / "preview.yaml"
    preview.write_text(f"version: {fleet.version(3)}\ncomponents: [{{name: server, image: x/s,"
                       f" digest: 'sha256:{'a' * 64}'}}]\n")  # fmt: skip
    code, plan, err = await fleet.procs.ctl("release", "publish", "--dry-run", str(preview))
    assert code == 0 and plan["refused"] is None, err
    assert plan["paths"] == {away.id: [required, fleet.version(3)]}
    code, _, _ = await fleet.procs.ctl("release", "show", fleet.version(3))
    assert code == 1, "a dry run publishes nothing"

    await fleet.start_agent(away)
    await fleet.wait_installed([away], newest, timeout=60)
    verdicts = [(r.release_version, r.phase, r.verdict) for r in await fleet.upgrades()
                if r.cell_id == away.id and r.phase == "succeeded"]  # fmt: skip
    # (A bake of no length: each outcome and its verdict in one report.)
    assert verdicts == [(required, "succeeded", "healthy"), (newest, "succeeded", "healthy")], (
        "the required release first, verified healthy, then the newest"
    )
    assert [r.release_version for r in await fleet.upgrades() if r.cell_id == on_time.id
            and r.verdict == "healthy"] == [required, newest]  # fmt: skip

    # A report the control plane missed (here: taken out of its records): the cell is no longer
    # counted updated, and an agent that starts again says it once more.
    redis = aioredis.from_url(fleet.procs.services.redis_url)
    fields = ("report_order", "report_generation", "report_phase", "report_verdict")
    await redis.hdel(f"rollout:cell:{on_time.id}", *fields)
    await redis.aclose()
    assert (await fleet.status(newest))["stages"]["staging"]["updated"] == 1
    await fleet.stop_agent(on_time)
    await fleet.start_agent(on_time)

    async def converged() -> bool:
        return bool((await fleet.status(newest))["stages"]["staging"]["updated"] == 2)

    await eventually(converged, timeout=30, interval=0.3, what="the missed report heard again")
