"""Applying a desired state inside the cell, with images verified against moto's ECR: the
phases, maintenance, failure and rollback, newest-generation-wins, and resuming a crash; then
judging it: its health checks (an HTTP page, a command, a Prometheus query against a
Prometheus-compatible endpoint on loopback) over its bake and watch, the verdict that is all
that leaves the cell, and a reversible release rolled back by the cell itself."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cell_agent.appliers import LocalApplier
from cell_agent.health import Judge, Judgement
from cell_agent.journal import Journal
from cell_agent.maintenance import MESSAGE, MaintenanceGate
from cell_agent.upgrade import EcrVerifier, Upgrader, repository_of
from common.clock import FakeClock
from common.health import HealthSpec, NoData, Verdict
from common.messages import Delivery, DesiredState
from common.releases import Component, Release
from common.vocabulary import UpgradePhase
from testing.fleet import push_image
from testing.polling import eventually
from testing.ports import free_port
from testing.probes import Probed, probe_server

DELIVERY = Delivery(
    message_id=None, user_id="svc", routing_key="c", redelivered=False, delivery_count=0
)


class Killed(BaseException):
    """The process dying mid-step: like a kill, nothing in the agent catches it."""


class Recorder:
    """An applier that writes like the local one and remembers what it saw."""

    def __init__(self, local: LocalApplier, gate: MaintenanceGate) -> None:
        self.local = local
        self.gate = gate
        self.calls: list[tuple[str, str, bool]] = []
        self.fail_on: str | None = None
        self.crash_on: str | None = None
        # Set: each component waits for it, an upgrade that takes as long as the test says.
        self.hold: asyncio.Event | None = None

    async def apply(self, component: Component, release: Release) -> None:
        self.calls.append((component.name, release.version, self.gate.is_on()))
        if self.hold is not None:
            await self.hold.wait()
        if component.name == self.crash_on:
            self.crash_on = None
            raise Killed
        if component.name == self.fail_on and release.version != "1.0":
            raise RuntimeError(f"{component.name} did not start")
        await self.local.apply(component, release)

    async def healthy(self, release: Release) -> bool:
        return await self.local.healthy(release)


class Cell:
    def __init__(self, state: Path, moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
        for k, v in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        self.state = state
        self.clock = FakeClock()
        self.reports: list[tuple[int, str | None, str, str | None]] = []
        self.maintenance: list[bool] = []
        self.verdicts: list[tuple[int, str, str | None, str | None]] = []
        self.restart()

    def restart(self, progress_after: float = 0.0) -> None:
        self.journal = Journal(self.state)
        self.gate = MaintenanceGate(self.state, self.clock, timedelta(minutes=15))
        self.local = LocalApplier(self.state)
        self.applier = Recorder(self.local, self.gate)
        self.upgrader = Upgrader(
            self.journal, applier=self.applier, verifier=EcrVerifier("eu-west-1"),
            gate=self.gate, clock=self.clock, report=self.report,
            report_maintenance=self.report_maintenance, progress_after=progress_after,
        )  # fmt: skip

    async def report(
        self,
        generation: int,
        version: str | None,
        phase: UpgradePhase,
        error: str | None,
        *,
        verdict: Verdict | None = None,
        check: str | None = None,
    ) -> bool:
        self.reports.append((generation, version, phase, error))
        self.verdicts.append((generation, phase, verdict, check))
        return True

    async def report_maintenance(self, enabled: bool, reason: str) -> bool:
        self.maintenance.append(enabled)
        return True

    async def want(
        self, generation: int, release: Release | None, health: HealthSpec | None = None
    ) -> None:
        msg = DesiredState(cell_id="acme", issued_at=self.clock.now(), generation=generation,
                           release=release, health=health)  # fmt: skip
        await self.upgrader.on_desired_state(msg, DELIVERY)

    def phases(self, generation: int) -> list[str]:
        return [phase for gen, _, phase, _ in self.reports if gen == generation]


@pytest.fixture
def cell(tmp_path: Path, moto: str, monkeypatch: pytest.MonkeyPatch) -> Cell:
    return Cell(tmp_path, moto, monkeypatch)


def release(
    moto: str, version: str, *, db_maintenance: bool = True, missing: bool = False
) -> Release:
    repo = f"substrate-{uuid.uuid4().hex[:6]}"
    server = push_image(moto, f"{repo}/server", version)
    db = push_image(moto, f"{repo}/db", version)
    if missing:
        db = "sha256:" + "0" * 64
    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    return Release(version=version, components=(
        Component(name="server", image=f"{host}/{repo}/server", digest=server),
        Component(name="db", image=f"{host}/{repo}/db:{version}", digest=db,
                  requires_maintenance=db_maintenance),
    ))  # fmt: skip


def test_repository_names_drop_the_registry_host_and_tag() -> None:
    assert repository_of("123.dkr.ecr.eu-west-1.amazonaws.com/team/server:1.2") == "team/server"
    assert repository_of("team/server") == "team/server"
    assert repository_of("localhost:5000/server@sha256:ab") == "server"


async def test_an_update_goes_through_every_phase_with_maintenance_only_around_it(
    cell: Cell, moto: str
) -> None:
    r1 = release(moto, "1.0")
    await cell.want(1, r1)
    await cell.upgrader.reconcile()
    assert cell.phases(1) == ["accepted", "verifying", "applying", "succeeded"]
    assert cell.maintenance == [True, False]
    assert not cell.gate.is_on()
    assert [c[2] for c in cell.applier.calls] == [True, True], "applied inside maintenance"
    assert cell.journal.applied.release == r1
    assert cell.local.manifest("db")["digest"] == r1.components[1].digest  # type: ignore[index]

    # A release changing only a component that needs no maintenance never closes the gate.
    r2 = r1.model_copy(update={"version": "1.1", "components": (
        Component(name="server", image=r1.components[0].image,
                  digest=push_image(moto, repository_of(r1.components[0].image), "1.1")),
        r1.components[1],
    )})  # fmt: skip
    await cell.want(2, r2)
    await cell.upgrader.reconcile()
    assert cell.phases(2)[-1] == "succeeded"
    assert cell.maintenance == [True, False]
    assert cell.applier.calls[-1] == ("server", "1.1", False)
    assert len(cell.applier.calls) == 3, "the unchanged db component was not re-applied"


async def test_an_upgrade_that_takes_a_moment_reports_its_outcome_alone(
    cell: Cell, moto: str
) -> None:
    # As the agent runs by default: a phase is reported once it has lasted a while (here far
    # longer than this upgrade's phases can take).
    cell.restart(progress_after=60.0)
    await cell.want(1, release(moto, "1.0"))
    await cell.upgrader.reconcile()
    assert cell.phases(1) == ["succeeded"]
    waiting = list(cell.upgrader._reporting)
    await asyncio.gather(*waiting, return_exceptions=True)
    assert waiting and all(t.cancelled() for t in waiting), "each phase's report called off"
    assert cell.phases(1) == ["succeeded"]


async def test_a_phase_that_lasts_is_reported_and_its_outcome_after_it(
    cell: Cell, moto: str
) -> None:
    cell.restart(progress_after=0.05)
    cell.applier.hold = asyncio.Event()
    await cell.want(1, release(moto, "1.0"))
    upgrading = asyncio.create_task(cell.upgrader.reconcile())
    try:
        await eventually(lambda: "applying" in cell.phases(1), timeout=10, what="applying reported")
        assert not upgrading.done(), "the components are still being applied"
    finally:
        cell.applier.hold.set()
        await upgrading
    phases = cell.phases(1)
    # `accepted` ends as it is made; `verifying` lasts as long as ECR's answer takes.
    assert phases[-2:] == ["applying", "succeeded"] and set(phases[:-2]) <= {"verifying"}, phases


async def test_a_missing_image_fails_before_anything_changes(cell: Cell, moto: str) -> None:
    r1 = release(moto, "1.0")
    await cell.want(1, r1)
    await cell.upgrader.reconcile()
    calls = len(cell.applier.calls)
    await cell.want(2, release(moto, "2.0", missing=True))
    await cell.upgrader.reconcile()
    gen, _, phase, error = cell.reports[-1]
    assert (gen, phase) == (2, "failed") and error and "images not found: db" in error
    assert len(cell.applier.calls) == calls
    assert cell.journal.applied.release == r1
    await cell.upgrader.reconcile()
    assert cell.phases(2).count("failed") == 1, "a failed generation is not retried"


async def test_a_failed_apply_restores_the_previous_release(cell: Cell, moto: str) -> None:
    r1 = release(moto, "1.0")
    await cell.want(1, r1)
    await cell.upgrader.reconcile()
    cell.applier.fail_on = "db"
    await cell.want(2, release(moto, "2.0"))
    await cell.upgrader.reconcile()
    assert cell.phases(2) == ["accepted", "verifying", "applying", "rolled_back"]
    assert "db did not start" in str(cell.reports[-1][3])
    assert await cell.local.healthy(r1), "every component is back on 1.0"
    assert cell.journal.applied.release == r1
    assert not cell.gate.is_on() and cell.maintenance[-1] is False


async def test_the_newest_generation_wins_and_none_is_applied_twice(cell: Cell, moto: str) -> None:
    r1, r2 = release(moto, "1.0"), release(moto, "2.0")
    await cell.want(2, r2)
    await cell.want(1, r1)  # late and older: ignored
    await cell.upgrader.reconcile()
    assert cell.journal.applied.release == r2
    calls = len(cell.applier.calls)
    await cell.want(2, r2)  # redelivered
    await cell.upgrader.reconcile()
    assert len(cell.applier.calls) == calls
    cell.restart()
    await cell.upgrader.reconcile()
    assert cell.applier.calls == [], "nothing re-applied after a restart"
    assert cell.phases(2) == ["accepted", "verifying", "applying", "succeeded"]


async def test_a_crash_while_applying_resumes_and_reports_one_outcome(
    cell: Cell, moto: str
) -> None:
    await cell.want(1, release(moto, "1.0"))
    await cell.upgrader.reconcile()
    r2 = release(moto, "2.0")
    cell.applier.crash_on = "db"
    await cell.want(2, r2)
    try:
        await cell.upgrader.reconcile()
    except Killed:
        pass
    else:
        raise AssertionError(
            f"the simulated crash did not happen: {cell.reports=} {cell.applier.calls=}"
        )
    assert cell.gate.is_on(), "killed inside maintenance"

    cell.restart()  # the agent starts again on the same state directory
    await cell.upgrader.reconcile()
    assert cell.journal.applied.release == r2
    assert [p for p in cell.phases(2) if p in ("succeeded", "failed", "rolled_back")] == [
        "succeeded"
    ]
    assert not cell.gate.is_on()


async def test_maintenance_is_time_boxed_even_if_the_agent_dies(cell: Cell) -> None:
    cell.gate.enter("updating")
    response = await cell.gate.route_gate("start")
    assert response.status == 503 and MESSAGE in response.body.decode()
    assert (await cell.gate.route_gate("running")).status == 404
    cell.restart()  # the gate's deadline is on disk
    assert cell.gate.is_on()
    cell.clock.advance(15 * 60 + 1)
    for action in ("start", "stop", "snapshot"):
        assert (await cell.gate.route_gate(action)).status == 200
    body = json.loads((await cell.gate.route_maintenance("")).body)
    assert body["maintenance"] is False


# -- health: the bake, the watch and the verdict -------------------------------------------------


@pytest.fixture
def probed() -> Iterator[Probed]:
    with probe_server() as probed:
        yield probed


@pytest.fixture
async def judging(cell: Cell) -> AsyncIterator[asyncio.Event]:
    """The agent's judging loop, running beside the test."""
    stop = asyncio.Event()
    task = asyncio.create_task(cell.upgrader.judge(stop))
    yield stop
    stop.set()
    cell.upgrader.wake()
    await asyncio.wait_for(task, 10)


def http(probed: Probed, **extra: Any) -> dict[str, Any]:
    return {"name": "web", "type": "http", "url": probed.url + "/healthz", **extra}


def spec(*checks: dict[str, Any], bake: float = 0, watch: float = 0) -> HealthSpec:
    return HealthSpec(checks=checks, bake_seconds=bake, watch_seconds=watch, interval_seconds=0.05)


def verdicts(cell: Cell, generation: int) -> list[tuple[str, str | None, str | None]]:
    return [(p, v, c) for g, p, v, c in cell.verdicts if g == generation and v is not None]


async def installed(
    cell: Cell, moto: str, health: HealthSpec, *, reversible: bool = True
) -> Release:
    """Release 1.0 applied with nothing to check, then 2.0 applied with ``health``."""
    r1 = release(moto, "1.0")
    await cell.want(1, r1)
    await cell.upgrader.reconcile()
    r2 = release(moto, "2.0").model_copy(update={"reversible": reversible})
    await cell.want(2, r2, health)
    await cell.upgrader.reconcile()
    progress = cell.journal.progress
    assert progress is not None and progress.phase == "succeeded", "applied; the verdict follows"
    # A bake with a length reports the outcome at once; one of none, with its verdict.
    assert (cell.phases(2)[-1:] == ["succeeded"]) == (health.bake_seconds > 0)
    return r1


async def test_a_reversible_release_that_fails_its_check_rolls_back_by_itself(
    cell: Cell, moto: str, probed: Probed, judging: asyncio.Event
) -> None:
    probed.status = 503
    r1 = await installed(cell, moto, spec(http(probed)))
    await eventually(lambda: verdicts(cell, 2), what="a verdict")
    assert verdicts(cell, 2) == [("rolled_back", "unhealthy", "web")]
    gen, _, phase, evidence = cell.reports[-1]
    assert (gen, phase) == (2, "rolled_back") and evidence == "status 503, wants 200"
    assert cell.journal.applied.release == r1, "the cell runs the release before it again"
    assert cell.local.manifest("db")["release"] == "1.0"  # type: ignore[index]
    assert cell.maintenance[-2:] == [True, False], "the rollback ran inside maintenance"


async def test_an_irreversible_release_stays_and_says_it_is_unhealthy(
    cell: Cell, moto: str, probed: Probed, judging: asyncio.Event
) -> None:
    probed.body = "starting"
    await installed(cell, moto, spec(http(probed, body_contains="ready")), reversible=False)
    await eventually(lambda: verdicts(cell, 2), what="a verdict")
    assert verdicts(cell, 2) == [("succeeded", "unhealthy", "web")]
    assert cell.journal.applied.release is not None
    assert cell.journal.applied.release.version == "2.0"
    assert "without 'ready' in the body" in (cell.reports[-1][3] or "")


async def test_a_healthy_bake_is_watched_and_a_later_breach_still_counts(
    cell: Cell, moto: str, probed: Probed, judging: asyncio.Event
) -> None:
    await installed(cell, moto, spec(http(probed), bake=0, watch=3600))
    await eventually(lambda: verdicts(cell, 2), what="the bake's verdict")
    assert verdicts(cell, 2) == [("succeeded", "healthy", None)]
    hits = probed.hits
    await eventually(lambda: probed.hits > hits + 2, what="looks during the watch")
    probed.status = 500
    await eventually(lambda: len(verdicts(cell, 2)) == 2, what="the watch's verdict")
    assert verdicts(cell, 2)[-1] == ("rolled_back", "unhealthy", "web")


@pytest.mark.parametrize(
    ("no_data", "expected"),
    [("fail", "unhealthy"), ("pass", "healthy"), ("inconclusive", "inconclusive")],
)
async def test_a_query_with_no_data_counts_as_its_check_declares(
    cell: Cell, moto: str, probed: Probed, judging: asyncio.Event, no_data: NoData, expected: str
) -> None:
    check = {"name": "errors", "type": "prometheus", "url": probed.url, "no_data": no_data,
             "query": "rate(errors[5m])", "comparison": "<", "threshold": 0.05}  # fmt: skip
    await installed(cell, moto, spec(check))
    await eventually(lambda: verdicts(cell, 2), what="a verdict")
    [(_, verdict, _)] = verdicts(cell, 2)
    assert verdict == expected
    outcomes = [p for g, p, _, _ in cell.verdicts if g == 2 and p in ("succeeded", "rolled_back")]
    assert len(outcomes) == 1, "a bake of no length: the outcome and its verdict in one report"
    if expected != "healthy":
        assert "no data: the query returned no sample" in (cell.reports[-1][3] or "")


async def test_a_query_names_the_value_it_saw_against_the_threshold(
    cell: Cell, moto: str, probed: Probed, judging: asyncio.Event
) -> None:
    probed.samples["errors"] = [0.01, 0.31, 0.2]
    check = {"name": "errors", "type": "prometheus", "url": probed.url, "query": "errors",
             "comparison": "<", "threshold": 0.05}  # fmt: skip
    await installed(cell, moto, spec(check))
    await eventually(lambda: verdicts(cell, 2), what="a verdict")
    assert verdicts(cell, 2) == [("rolled_back", "unhealthy", "errors")]
    assert cell.reports[-1][3] == "observed 0.31, wants < 0.05"


async def test_a_command_check_judges_by_its_exit_code_and_its_timeout() -> None:
    ok = {"name": "ok", "type": "command", "command": ["sh", "-c", "exit 0"]}
    bad = {"name": "bad", "type": "command", "command": ["sh", "-c", "exit 3"]}
    slow = {"name": "slow", "type": "command", "command": ["sleep", "30"],
            "timeout_seconds": 0.2, "no_data": "inconclusive"}  # fmt: skip
    failed = await Judge([ok, bad]).look(0.0)
    assert failed is not None and (failed.check, failed.evidence) == ("bad", "exit code 3, wants 0")
    judge = Judge([ok, slow])
    assert await judge.look(0.0) is None
    end = judge.at_end(0.0)
    assert (end.verdict, end.check) == ("inconclusive", "slow")
    assert "still running after 0.2s" in (end.evidence or "")


async def test_a_breach_counts_only_once_it_has_lasted_its_for_seconds(probed: Probed) -> None:
    judge = Judge([http(probed, for_seconds=30)])
    probed.status = 500
    assert await judge.look(0.0) is None
    assert await judge.look(29.0) is None
    end = judge.at_end(29.0)
    assert end.verdict == "inconclusive", "a breach not yet long enough decides nothing"
    probed.status = 200
    assert await judge.look(40.0) is None, "a pass in between starts it again"
    probed.status = 500
    assert await judge.look(50.0) is None
    failed = await judge.look(80.0)
    assert failed is not None and failed.verdict == "unhealthy"


async def test_a_check_this_agent_does_not_know_is_inconclusive_not_refused() -> None:
    judge = Judge([{"name": "future", "type": "tracing", "service": "x"}])
    assert await judge.look(0.0) is None
    end = judge.at_end(0.0)
    assert (end.verdict, end.check) == ("inconclusive", "future")
    assert "this agent cannot run it" in (end.evidence or "")


async def test_a_restart_mid_bake_goes_on_baking_and_reports_once(
    cell: Cell, moto: str, probed: Probed
) -> None:
    await installed(cell, moto, spec(http(probed), bake=600))
    progress = cell.journal.progress
    assert progress is not None and progress.health == "baking"
    cell.restart()  # the agent dies mid-bake; the journal is all that is left
    stop = asyncio.Event()
    task = asyncio.create_task(cell.upgrader.judge(stop))
    try:
        await eventually(lambda: probed.hits >= 2, what="looks after the restart")
        assert verdicts(cell, 2) == [], "the bake is not over"
        cell.clock.advance(601)
        await eventually(lambda: verdicts(cell, 2), what="the bake's verdict")
        assert verdicts(cell, 2) == [("succeeded", "healthy", None)]
        done = cell.journal.progress
        assert done is not None and done.health == "done" and done.reported
        cell.restart()
        assert cell.upgrader._judged() is None, "judged once: a later start looks no more"
    finally:
        stop.set()
        cell.upgrader.wake()
        await asyncio.wait_for(task, 10)


async def test_a_query_is_judged_against_a_real_prometheus(probed: Probed, tmp_path: Path) -> None:
    """The same check against Debian's Prometheus, scraping a metric the test sets."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: make test installs Debian's package"
    probed.metrics["product_error_ratio"] = 0.31
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = probed.url.removeprefix("http://")
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: product, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    process = await asyncio.create_subprocess_exec(
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        # Inconclusive until Prometheus is up and has scraped (no answer, no sample).
        errors = {
            "name": "errors",
            "type": "prometheus",
            "url": url,
            "no_data": "inconclusive",
            "query": "max(product_error_ratio)",
            "comparison": "<",
            "threshold": 0.05,
        }
        absent = {**errors, "name": "absent", "query": "product_missing_metric",
                  "no_data": "inconclusive"}  # fmt: skip

        async def judged() -> Judgement | None:
            return await Judge([errors]).look(0.0)

        failed = await eventually(judged, timeout=60, interval=0.5, what="a scraped sample")
        assert (failed.check, failed.evidence) == ("errors", "observed 0.31, wants < 0.05")
        nothing = Judge([absent])
        assert await nothing.look(0.0) is None
        end = nothing.at_end(0.0)
        assert end.verdict == "inconclusive" and "no sample" in (end.evidence or "")
        probed.metrics["product_error_ratio"] = 0.01
        await eventually(lambda: _passes(errors), timeout=30, interval=0.5, what="recovered")
    finally:
        process.kill()
        await process.wait()


async def _passes(check: dict[str, Any]) -> bool:
    judge = Judge([check])
    return await judge.look(0.0) is None and judge.at_end(0.0).verdict == "healthy"
