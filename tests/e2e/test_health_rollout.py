"""Health-judged rollouts end to end, with real agents: a release that applies everywhere but
hurts the dedicated cells stops at the canary, which rolls itself back; a re-bootstrapped cell's
failed install is shown and converges; a cell back from two releases behind walks the required
one first; a missed report is heard again."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from functools import partial
from typing import Any

import pytest
import redis.asyncio as aioredis

from testing.cells import status_is
from testing.fleet import POLICY, Fleet, hide_image, restore_image
from testing.polling import eventually

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
    # No soaks: what this shows is where the release stops, not the waiting between stages.
    (fleet.root / "no-soaks.yaml").write_text(
        "soak_seconds: {staging: 0, saas: 0, dedicated: 0}\nprogress_deadline_seconds: 60\n"
    )
    code, _, err = await fleet.procs.ctl(
        "rollout", "policy", "set", str(fleet.root / "no-soaks.yaml")
    )
    assert code == 0, err
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

    # A report the control plane missed (here: taken out of its records, and the cell marked
    # changed as every writer of rollout's records but the controller marks it): the cell is
    # no longer counted updated once the controller has read it again, and an agent that
    # starts again says it once more.
    redis = aioredis.from_url(fleet.procs.services.redis_url)
    fields = ("report_order", "report_generation", "report_phase", "report_verdict")
    await redis.hdel(f"rollout:cell:{on_time.id}", *fields)
    await redis.sadd("rollout:dirty", on_time.id)
    await redis.aclose()

    async def missed() -> bool:
        return bool((await fleet.status(newest))["stages"]["staging"]["updated"] == 1)

    await eventually(missed, timeout=30, interval=0.3, what="the missed report counted")
    await fleet.stop_agent(on_time)
    await fleet.start_agent(on_time)

    async def converged() -> bool:
        return bool((await fleet.status(newest))["stages"]["staging"]["updated"] == 2)

    await eventually(converged, timeout=30, interval=0.3, what="the missed report heard again")
