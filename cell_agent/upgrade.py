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
from typing import Protocol

import boto3

from cell_agent.appliers import Applier
from cell_agent.journal import Applied, Desired, Journal, Progress
from cell_agent.maintenance import MaintenanceGate
from common.clock import Clock
from common.crashpoints import crash_point
from common.messages import Delivery, DesiredState
from common.releases import Component, Release
from common.runner import wait_any
from common.vocabulary import TERMINAL_PHASES, UpgradePhase

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


Report = Callable[[int, str | None, UpgradePhase, str | None], Awaitable[bool]]
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

    async def on_desired_state(self, msg: DesiredState, delivery: Delivery) -> None:
        """Journal it (newest generation wins) and return: the command is acked now."""
        desired = Desired(
            generation=msg.generation, release=msg.release, received_at=self.clock.now()
        )
        if self.journal.want(desired):
            log.info("desired state generation %d journaled", msg.generation)
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

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
        if progress is not None and progress.phase in TERMINAL_PHASES and not progress.reported:
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
        if await self.report(progress.generation, version, progress.phase, progress.error):
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
        progress = await self._set(progress, "succeeded")
        await self._report_outcome(progress)
        log.info(
            "generation %d applied (%s)",
            desired.generation,
            release.version if release else "nothing",
        )
