"""Applying a desired state inside the cell (flow 4 of ARCHITECTURE).

The command handler only journals the desired state and returns, so the command is acked at
once: an upgrade can outlast the broker's consumer_timeout and must never hold a delivery. A
separate loop reconciles the journal: verify every image digest, enter maintenance if a changed
component needs it, apply the changed components in order, check health, leave maintenance,
record the release as applied, report. A crash at any step resumes from the journal on the
next start; a generation recorded as applied is never applied again, and the final outcome of
a generation is reported until it is published once.

A phase on the way (accepted, verifying, applying) is reported once it has lasted
``progress_after`` seconds, the outcome at once: an upgrade that takes minutes shows where it
is, and one that takes a moment sends its outcome alone. Every report a cell sends is a message
each of rollout's and flags' queues takes in: with every phase reported, a large rollout's
messages were mostly phases nobody needed (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Protocol

import boto3

from cell_agent.appliers import Applier
from cell_agent.health import Judge, Judgement
from cell_agent.journal import Applied, Desired, Journal, Progress
from cell_agent.maintenance import MaintenanceGate
from common.clock import Clock
from common.crashpoints import crash_point
from common.health import Verdict
from common.messages import Delivery, DesiredState
from common.releases import Component, Release
from common.runner import wait_any
from common.vocabulary import FAILED_PHASES, TERMINAL_PHASES, UpgradePhase

log = logging.getLogger(__name__)

# Seconds between attempts to report a finished upgrade while the broker is unreachable.
REPORT_RETRY_SECONDS = 5.0


class ImageVerifier(Protocol):
    async def missing(self, components: Sequence[Component]) -> list[str]: ...


def repository_of(image: str) -> str:
    """``<registry host>/<repo>[:tag]`` -> ``<repo>``; a first part with a dot, a colon or
    ``localhost`` is a registry host."""
    first, _, rest = image.partition("/")
    name = rest if rest and ("." in first or ":" in first or first == "localhost") else image
    return name.rsplit("@", 1)[0].split(":", 1)[0]


class EcrVerifier:
    """Checks each digest exists in the release registry through ECR's API."""

    def __init__(self, region: str) -> None:
        self.region = region

    def _missing(self, components: Sequence[Component]) -> list[str]:
        ecr = boto3.client("ecr", region_name=self.region)
        missing = []
        for c in components:
            try:
                ecr.describe_images(
                    repositoryName=repository_of(c.image), imageIds=[{"imageDigest": c.digest}]
                )
            except (
                ecr.exceptions.ImageNotFoundException,
                ecr.exceptions.RepositoryNotFoundException,
            ):
                missing.append(f"{c.name} ({c.image}@{c.digest})")
        return missing

    async def missing(self, components: Sequence[Component]) -> list[str]:
        return await asyncio.to_thread(self._missing, components)


class Report(Protocol):
    async def __call__(
        self,
        generation: int,
        version: str | None,
        phase: UpgradePhase,
        error: str | None,
        *,
        verdict: Verdict | None = None,
        check: str | None = None,
    ) -> bool: ...


MaintenanceReport = Callable[[bool, str], Awaitable[bool]]


class Upgrader:
    def __init__(
        self,
        journal: Journal,
        *,
        applier: Applier,
        verifier: ImageVerifier,
        gate: MaintenanceGate,
        clock: Clock,
        report: Report,
        report_maintenance: MaintenanceReport,
        progress_after: float = 0.0,
    ) -> None:
        self.journal = journal
        self.applier = applier
        self.verifier = verifier
        self.gate = gate
        self.clock = clock
        self.report = report
        self.report_maintenance = report_maintenance
        self.progress_after = progress_after
        self._wake = asyncio.Event()
        # The report of the phase under way, until it has lasted progress_after; and every such
        # report still going out (the loop keeps only weak references to tasks).
        self._progress_due: asyncio.Task[None] | None = None
        self._reporting: set[asyncio.Task[None]] = set()
        # Applying a release and rolling one back after a bad verdict never overlap.
        self._changing = asyncio.Lock()
        self._judge_wake = asyncio.Event()

    async def on_desired_state(self, msg: DesiredState, delivery: Delivery) -> None:
        """Journal it (newest generation wins) and return: the command is acked now."""
        desired = Desired(
            generation=msg.generation,
            release=msg.release,
            received_at=self.clock.now(),
            health=msg.health,
        )
        if self.journal.want(desired):
            log.info("desired state generation %d journaled", msg.generation)
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()
        self._judge_wake.set()

    async def report_again(self) -> None:
        """Report the last outcome (and verdict) once more, if it was reported: at start and
        after a reconnect, so a control plane that missed it converges on what the cell runs
        (report order makes a copy it has a no-op)."""
        progress = self.journal.progress
        if progress is not None and progress.phase in TERMINAL_PHASES and progress.reported:
            await self._report_outcome(progress)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("upgrade step failed; retrying")
            unreported = (p := self.journal.progress) is not None and not p.reported
            await wait_any(stop, self._wake, timeout=REPORT_RETRY_SECONDS if unreported else None)
        self._forget_progress()

    async def reconcile(self) -> None:
        progress = self.journal.progress
        desired = self.journal.desired
        if (
            progress is not None
            and progress.phase in TERMINAL_PHASES
            and not progress.reported
            and not self._verdict_reports(desired, progress)
        ):
            await self._report_outcome(progress)
        if desired is None or desired.generation <= self.journal.applied.generation:
            return
        if (
            progress is not None
            and progress.generation == desired.generation
            and progress.phase
            in (
                "failed",
                "rolled_back",
            )
        ):
            return  # this generation failed; only a newer one is tried
        async with self._changing:
            await self._upgrade(desired, progress)

    async def _set(
        self, progress: Progress, phase: UpgradePhase, error: str | None = None
    ) -> Progress:
        progress = progress.model_copy(update={"phase": phase, "error": error})
        self.journal.set_progress(progress)
        crash_point("upgrade.phase", phase)
        self._forget_progress()
        if phase not in TERMINAL_PHASES:
            version = (
                self.journal.desired.release.version
                if self.journal.desired and self.journal.desired.release
                else None
            )
            if self.progress_after > 0:
                due = asyncio.create_task(
                    self._report_progress(progress.generation, version, phase)
                )
                self._progress_due = due
                self._reporting.add(due)
                due.add_done_callback(self._reporting.discard)
            else:
                await self.report(progress.generation, version, phase, error)
        return progress

    async def _report_progress(
        self, generation: int, version: str | None, phase: UpgradePhase
    ) -> None:
        await asyncio.sleep(self.progress_after)
        # From here the report is not called off: the agent keeps it in its outbox before its
        # first await, so a later phase, reported after this point, goes out after it.
        self._progress_due = None
        try:
            await self.report(generation, version, phase, None)
        except Exception:
            log.exception("reporting %s of generation %d failed", phase, generation)

    def _forget_progress(self) -> None:
        """The phase under way ended before it was worth reporting."""
        if self._progress_due is not None:
            self._progress_due.cancel()
            self._progress_due = None

    async def _report_outcome(self, progress: Progress) -> None:
        desired = self.journal.desired
        version = desired.release.version if desired and desired.release else None
        if progress.phase in FAILED_PHASES or progress.verdict == "unhealthy":
            log.warning(
                "generation %d (%s) %s: %s",
                progress.generation,
                version or "nothing",
                progress.verdict or progress.phase,
                progress.error or "no reason given",
            )
        reported = await self.report(
            progress.generation,
            version,
            progress.phase,
            progress.error,
            verdict=progress.verdict,
            check=progress.check,
        )
        if reported:
            self.journal.set_progress(progress.model_copy(update={"reported": True}))

    async def _upgrade(self, desired: Desired, progress: Progress | None) -> None:
        applied = self.journal.applied
        if progress is not None and progress.generation == desired.generation:
            log.info("resuming generation %d from %s", desired.generation, progress.phase)
            previous = progress.previous
        else:
            previous = applied.release
            progress = Progress(generation=desired.generation, phase="accepted", previous=previous)
            progress = await self._set(progress, "accepted")
        release = desired.release
        if release is None:
            await self._finish(desired, progress, None, maintenance=False)
            return

        progress = await self._set(progress, "verifying")
        missing = await self.verifier.missing(release.components)
        if missing:
            # Nothing has changed in the cell: the previous release is still the running one.
            progress = await self._set(
                progress, "failed", "images not found: " + ", ".join(missing)
            )
            await self._report_outcome(progress)
            return

        before = {c.name: c.digest for c in previous.components} if previous else {}
        changed = [c for c in release.components if before.get(c.name) != c.digest]
        maintenance = any(c.requires_maintenance for c in changed)
        progress = await self._set(progress, "applying")
        try:
            if maintenance:
                self.gate.enter(f"updating to {release.version}")
                await self.report_maintenance(True, f"updating to {release.version}")
            for component in changed:
                if component.name in progress.done:
                    continue  # applied before a restart
                await self.applier.apply(component, release)
                progress = progress.model_copy(update={"done": (*progress.done, component.name)})
                self.journal.set_progress(progress)
                crash_point("upgrade.component", component.name)
                self.gate.renew()
            if not await self.applier.healthy(release):
                raise RuntimeError(f"release {release.version} is not healthy after applying")
        except Exception as exc:
            log.warning(
                "applying %s failed: %s; restoring %s",
                release.version,
                exc,
                previous.version if previous else "nothing",
            )
            await self._restore(previous, changed)
            if maintenance:
                self.gate.leave()
                await self.report_maintenance(False, "update failed; previous release restored")
            outcome: UpgradePhase = "rolled_back" if previous is not None else "failed"
            progress = await self._set(progress, outcome, str(exc)[:500])
            await self._report_outcome(progress)
            return
        await self._finish(desired, progress, release, maintenance=maintenance)

    async def _restore(self, previous: Release | None, changed: list[Component]) -> None:
        if previous is None:
            return
        names = {c.name for c in changed}
        for component in previous.components:
            if component.name in names:
                await self.applier.apply(component, previous)

    async def _finish(
        self, desired: Desired, progress: Progress, release: Release | None, *, maintenance: bool
    ) -> None:
        self.journal.set_applied(Applied(generation=desired.generation, release=release))
        if maintenance:
            self.gate.leave()
            await self.report_maintenance(False, "update finished")
        if release is not None and desired.health is not None:
            now = self.clock.now()
            bake_until = now + timedelta(seconds=desired.health.bake_seconds)
            watch_until = bake_until + timedelta(seconds=desired.health.watch_seconds)
            progress = progress.model_copy(
                update={"health": "baking", "bake_until": bake_until, "watch_until": watch_until}
            )
        progress = await self._set(progress, "succeeded")
        if not self._verdict_reports(desired, progress):
            await self._report_outcome(progress)
        log.info(
            "generation %d applied (%s)%s",
            desired.generation,
            release.version if release else "nothing",
            f"; checking its health for {desired.health.bake_seconds:g}s"
            if desired.health is not None and progress.health
            else "",
        )
        self._judge_wake.set()

    # -- health: the bake and the watch after applying (cell_agent/health.py) ------------------

    @staticmethod
    def _verdict_reports(desired: Desired | None, progress: Progress) -> bool:
        """With a bake of no length the verdict follows at once: the outcome goes out with it,
        one report instead of two (over a large rollout, half its messages)."""
        return (
            progress.health == "baking"
            and desired is not None
            and desired.generation == progress.generation
            and desired.health is not None
            and desired.health.bake_seconds == 0
        )

    def _judged(self) -> tuple[Desired, Progress] | None:
        """The applied generation under bake or watch, if there is one."""
        progress, desired = self.journal.progress, self.journal.desired
        if (
            progress is None
            or progress.health not in ("baking", "watching")
            or desired is None
            or desired.health is None
            or desired.generation != progress.generation
            or self.journal.applied.generation != progress.generation
        ):
            return None
        return desired, progress

    async def judge(self, stop: asyncio.Event) -> None:
        """Bake, then watch, the release applied last: look at its checks every interval and
        report the verdict (rolling a reversible release back when it is unhealthy)."""
        judge: Judge | None = None
        while not stop.is_set():
            self._judge_wake.clear()
            current = self._judged()
            if current is None:
                judge = None
                await wait_any(stop, self._judge_wake)
                continue
            desired, progress = current
            assert desired.health is not None
            if judge is None or judge.generation != progress.generation:
                judge = Judge(desired.health.checks, generation=progress.generation)
            try:
                pause = await self._look(judge, desired, progress)
            except Exception:
                log.exception("judging generation %d failed; trying again", progress.generation)
                pause = desired.health.interval_seconds
            await wait_any(stop, self._judge_wake, timeout=pause)

    async def _look(self, judge: Judge, desired: Desired, progress: Progress) -> float:
        """One look at the checks; how long to wait before the next."""
        assert desired.health is not None and progress.bake_until and progress.watch_until
        bake_until, watch_until = progress.bake_until, progress.watch_until
        failed = await judge.look(self.clock.monotonic())
        now = self.clock.now()
        if self._judged() != (desired, progress):
            return 0.0  # a newer desired state came meanwhile: it is judged afresh
        if failed is not None:
            await self._unhealthy(desired, progress, failed)
            return 0.0
        if progress.health == "baking" and now >= bake_until:
            verdict = judge.at_end(self.clock.monotonic())
            watch = verdict.verdict == "healthy" and now < watch_until
            progress = progress.model_copy(
                update={
                    "health": "watching" if watch else "done",
                    "verdict": verdict.verdict,
                    "check": verdict.check,
                    "error": verdict.evidence,
                    "reported": False,
                }
            )
            self.journal.set_progress(progress)
            log.info(
                "generation %d baked: %s%s",
                progress.generation,
                verdict.verdict,
                f" (check {verdict.check}: {verdict.evidence})" if verdict.check else "",
            )
            await self._report_outcome(progress)
            return 0.0
        if progress.health == "watching" and now >= watch_until:
            self.journal.set_progress(progress.model_copy(update={"health": "done"}))
            return 0.0
        until = bake_until if progress.health == "baking" else watch_until
        left = (until - now).total_seconds()
        return max(0.0, min(desired.health.interval_seconds, left))

    async def _unhealthy(self, desired: Desired, progress: Progress, failed: Judgement) -> None:
        """A check's failure counted: a reversible release goes back to the one before it
        (the cell's own decision, before any control plane hears of it); an irreversible one
        stays, and the verdict halts its rollout."""
        release = desired.release
        assert release is not None
        async with self._changing:
            if self._judged() is None:
                return  # a newer desired state is being applied
            log.warning(
                "release %s is unhealthy: check %s: %s",
                release.version,
                failed.check,
                failed.evidence,
            )
            phase: UpgradePhase = "succeeded"
            previous = progress.previous
            if release.reversible and previous is not None:
                before = {c.name: c.digest for c in previous.components}
                changed = [c for c in release.components if before.get(c.name) != c.digest]
                maintenance = any(c.requires_maintenance for c in changed)
                if maintenance:
                    self.gate.enter(f"rolling {release.version} back")
                    await self.report_maintenance(True, f"rolling {release.version} back")
                await self._restore(previous, changed)
                self.journal.set_applied(Applied(generation=desired.generation, release=previous))
                if maintenance:
                    self.gate.leave()
                    await self.report_maintenance(False, "unhealthy release rolled back")
                phase = "rolled_back"
                log.warning("rolled back to %s", previous.version)
            progress = progress.model_copy(
                update={
                    "phase": phase,
                    "health": "done",
                    "verdict": "unhealthy",
                    "check": failed.check,
                    "error": failed.evidence,
                    "reported": False,
                }
            )
            self.journal.set_progress(progress)
            await self._report_outcome(progress)
