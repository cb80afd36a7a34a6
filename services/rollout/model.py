"""The rollout service's decisions, pure: what a release file and a policy must contain, which
cells a release reaches in which stage and wave, and each step of the controller.

The controller (``controller.py``) only loads state, calls :func:`step`, :func:`catch_up` and
:func:`superseded`, and writes what they return; every decision is made here, from the state
and the time it is given, so it can be tested without a broker, Redis or a clock."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.messages import (
    CellFailure,
    Component,
    Digest,
    Event,
    Release,
    RolloutCompleted,
    RolloutHalted,
    RolloutProgressed,
    RolloutState,
    Stage,
)
from common.versions import SemVer, SemVerText


class ComponentFile(BaseModel):
    # forbid: a misspelt key (say ``requires_maintainance``) must be an error, not a default.
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    image: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\s@]+$")]
    digest: Digest
    requires_maintenance: bool = False


class ReleaseFile(BaseModel):
    """What ``substratectl release publish FILE`` accepts (YAML or JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: SemVerText
    components: list[ComponentFile] = Field(min_length=1)
    reversible: bool = True
    notes: str = Field(default="", max_length=10_000)

    @field_validator("components")
    @classmethod
    def _unique_names(cls, components: list[ComponentFile]) -> list[ComponentFile]:
        names = [c.name for c in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"component names must be unique; repeated: {', '.join(duplicates)}")
        return components

    def release(self) -> Release:
        return Release(
            version=self.version,
            components=tuple(Component(**c.model_dump()) for c in self.components),
            reversible=self.reversible,
            notes=self.notes,
        )


class VersionRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str


def newest_first(versions: list[str]) -> list[str]:
    """Semantic-version order, newest first (unparseable ones last, as stored)."""
    good = [(parsed, v) for v in versions if (parsed := SemVer.parse(v)) is not None]
    good.sort(key=lambda pair: pair[0], reverse=True)
    return [v for _, v in good] + [v for v in versions if SemVer.parse(v) is None]


# -- planning -------------------------------------------------------------------------------------

STAGE_ORDER: tuple[Stage, ...] = ("staging", "saas", "dedicated")
SkipReason = Literal["decommissioned", "offline", "pinned", "held", "not_registered", "up_to_date"]


class WavePolicy(BaseModel):
    """How ``dedicated`` is split: a canary of ``canary`` cells, then waves that bring the
    updated share of the remaining cells up to each fraction in turn."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canary: int = Field(default=1, ge=0)
    fractions: tuple[float, ...] = (0.1, 0.5, 1.0)

    @field_validator("fractions")
    @classmethod
    def _growing_to_all(cls, fractions: tuple[float, ...]) -> tuple[float, ...]:
        if not fractions or fractions[-1] != 1.0:
            raise ValueError("the last wave must reach 1.0 (every cell)")
        if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
            raise ValueError("fractions must grow strictly, each in (0, 1]")
        return fractions


class CellFacts(BaseModel):
    """What rollout knows of a cell, from the registry's events and the cell's reports, and the
    desired state rollout last sent it."""

    model_config = ConfigDict(frozen=True)

    id: str
    stage: Stage
    status: Literal["created", "online", "offline", "decommissioned"]
    installed_release: str | None = None
    pinned: str | None = None
    held: bool = False
    # The desired state last sent (generation None: never sent one; version None: nothing).
    desired_version: str | None = None
    desired_generation: int | None = None
    desired_at: datetime | None = None
    previous_version: str | None = None
    # The cell's last upgrade report.
    report_generation: int | None = None
    report_phase: str | None = None
    report_error: str | None = None


class Plan(BaseModel):
    version: str
    stages: dict[str, list[list[str]]]
    skipped: dict[str, SkipReason]


def _order_key(version: str, cell_id: str) -> str:
    """A stable order that differs per release, so the canary is not always the same cell."""
    return hashlib.sha256(f"{version}:{cell_id}".encode()).hexdigest()


def split_waves(cell_ids: list[str], version: str, policy: WavePolicy) -> list[list[str]]:
    ordered = sorted(cell_ids, key=lambda c: _order_key(version, c))
    waves: list[list[str]] = []
    canary = ordered[: policy.canary]
    if canary:
        waves.append(canary)
    rest = ordered[len(canary) :]
    taken = 0
    for fraction in policy.fractions:
        upto = max(taken, math.ceil(fraction * len(rest)))
        if upto > taken:
            waves.append(rest[taken:upto])
            taken = upto
    return waves


def skip_reason(cell: CellFacts, version: str) -> SkipReason | None:
    if cell.status == "decommissioned":
        return "decommissioned"
    if cell.status == "created":
        return "not_registered"
    if cell.pinned is not None:
        return "pinned"
    if cell.held:
        return "held"
    target, installed = SemVer.parse(version), SemVer.parse(cell.installed_release)
    if installed is not None and target is not None and installed >= target:
        return "up_to_date"  # a cell never goes backwards
    if cell.status == "offline":
        return "offline"
    return None


def plan(version: str, cells: list[CellFacts], policy: WavePolicy) -> Plan:
    """Which cells a release reaches in which stage and wave, and which are skipped and why.
    staging and saas go as one wave each; dedicated goes in the policy's waves."""
    skipped: dict[str, SkipReason] = {}
    by_stage: dict[str, list[str]] = {stage: [] for stage in STAGE_ORDER}
    for cell in sorted(cells, key=lambda c: c.id):
        reason = skip_reason(cell, version)
        if reason is None:
            by_stage[cell.stage].append(cell.id)
        else:
            skipped[cell.id] = reason
    stages = {
        stage: (
            split_waves(ids, version, policy) if stage == "dedicated" else ([ids] if ids else [])
        )
        for stage, ids in by_stage.items()
    }
    return Plan(version=version, stages=stages, skipped=skipped)


# -- policy ---------------------------------------------------------------------------------------


class SoakTimes(BaseModel):
    """Seconds a release bakes after a stage before the next one starts. For ``dedicated`` it is
    the bake between waves (after the canary, after each wave); after the last wave the
    rollout is complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    staging: float = Field(default=1800, ge=0)
    saas: float = Field(default=3600, ge=0)
    dedicated: float = Field(default=1800, ge=0)


class RolloutPolicy(BaseModel):
    """What ``substratectl rollout policy set FILE`` accepts; every key is optional and the
    defaults are the documented ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    soak_seconds: SoakTimes = Field(default_factory=SoakTimes)
    waves: WavePolicy = Field(default_factory=WavePolicy)
    # Failed cells a wave tolerates; one more halts the rollout.
    failure_threshold: int = Field(default=0, ge=0)
    # A cell that was sent the release and has not reported an outcome by then counts as failed.
    progress_deadline_seconds: float = Field(default=1800, gt=0)
    # skip: an offline cell is left out of its wave and updated when it returns.
    # wait: it stays in its wave and counts as failed if it has not updated by the deadline.
    offline_cells: Literal["skip", "wait"] = "skip"


# -- rollouts -------------------------------------------------------------------------------------

ACTIVE: tuple[RolloutState, ...] = ("in_progress", "soaking", "halted", "paused")


class Halt(BaseModel):
    model_config = ConfigDict(frozen=True)

    reason: str
    failures: tuple[CellFailure, ...] = ()


class Rollout(BaseModel):
    """One release's way through the fleet, as the controller keeps it between steps."""

    model_config = ConfigDict(frozen=True)

    version: str
    reversible: bool = True
    state: RolloutState = "in_progress"
    stage: Stage = "staging"
    # The current stage's waves, fixed when the stage starts (None: not started yet).
    waves: tuple[tuple[str, ...], ...] | None = None
    wave: int = 0
    wave_started_at: datetime | None = None
    soak_until: datetime | None = None
    # Stages whose first wave finished: a cell of such a stage that was not in a wave
    # (registered since, or offline then) gets the release when it can.
    reached: tuple[Stage, ...] = ()
    # Cells whose failure an operator accepted by resuming; they no longer count.
    accepted: tuple[str, ...] = ()
    halt: Halt | None = None
    # Set once an abort of a reversible release has sent its cells back.
    reverted: bool = False
    created_at: datetime
    updated_at: datetime
    # Bumped by every write, so a write based on an older read is refused.
    rev: int = 0

    @property
    def semver(self) -> SemVer:
        parsed = SemVer.parse(self.version)
        assert parsed is not None  # releases are validated at publish
        return parsed

    def started_cells(self) -> set[str]:
        return {c for wave in (self.waves or ())[: self.wave + 1] for c in wave}

    def waiting_cells(self) -> set[str]:
        return {c for wave in (self.waves or ())[self.wave + 1 :] for c in wave}


def new_rollout(release: Release, now: datetime) -> Rollout:
    return Rollout(
        version=release.version, reversible=release.reversible, created_at=now, updated_at=now
    )


def newer(a: str | None, b: str | None) -> bool:
    """Whether release ``a`` is newer than ``b`` (nothing is older than everything)."""
    pa, pb = SemVer.parse(a), SemVer.parse(b)
    if pa is None:
        return False
    return pb is None or pa > pb


def at_least(a: str | None, b: str) -> bool:
    return a is not None and (a == b or newer(a, b))


# -- a cell with respect to one release -----------------------------------------------------------

CellProgress = Literal[
    "updated", "in_progress", "failed", "timed_out", "superseded", "pinned", "held", "offline",
    "pending", "not_registered", "decommissioned",
]  # fmt: skip


def cell_progress(
    cell: CellFacts, version: str, policy: RolloutPolicy, now: datetime
) -> CellProgress:
    if cell.status == "decommissioned":
        return "decommissioned"
    if cell.status == "created":
        return "not_registered"
    if at_least(cell.installed_release, version):
        return "updated"
    if cell.desired_generation is not None and cell.desired_version == version:
        if cell.report_generation == cell.desired_generation:
            if cell.report_phase in ("failed", "rolled_back"):
                return "failed"
            if cell.report_phase == "succeeded":
                return "updated"
        deadline = timedelta(seconds=policy.progress_deadline_seconds)
        if cell.desired_at is not None and now - cell.desired_at > deadline:
            return "timed_out"
        return "in_progress"
    if cell.desired_generation is not None and newer(cell.desired_version, version):
        return "superseded"
    if cell.pinned is not None:
        return "pinned"
    if cell.held:
        return "held"
    if cell.status == "offline":
        return "offline"
    return "pending"


def failure_of(cell: CellFacts, progress: CellProgress, policy: RolloutPolicy) -> str:
    if progress == "failed":
        return cell.report_error or f"upgrade {cell.report_phase}"
    if progress == "timed_out":
        return f"no outcome reported within {policy.progress_deadline_seconds:g}s"
    return f"offline for longer than the {policy.progress_deadline_seconds:g}s deadline"


# -- the controller's step ------------------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    """Send ``cell_id`` a desired state for ``version`` (None: nothing installed)."""

    cell_id: str
    version: str | None
    previous: str | None


@dataclass
class Decision:
    rollout: Rollout
    assign: list[Assign] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.assign or self.events)


def stage_counts(
    rollout: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime
) -> dict[str, dict[str, int]]:
    """Per stage: cells ``total``, ``updated``, ``in_progress``, ``failed``, ``offline``,
    ``held``, ``pinned`` and ``pending`` for this release (decommissioned cells not counted)."""
    keys = ("total", "updated", "in_progress", "failed", "offline", "held", "pinned", "pending")
    counts: dict[str, dict[str, int]] = {stage: dict.fromkeys(keys, 0) for stage in STAGE_ORDER}
    bucket = {
        "updated": "updated", "in_progress": "in_progress", "superseded": "in_progress",
        "failed": "failed", "timed_out": "failed", "offline": "offline", "held": "held",
        "pinned": "pinned", "pending": "pending", "not_registered": "pending",
    }  # fmt: skip
    for cell in cells:
        progress = cell_progress(cell, rollout.version, policy, now)
        if progress == "decommissioned":
            continue
        counts[cell.stage]["total"] += 1
        counts[cell.stage][bucket[progress]] += 1
    return counts


def _progressed(r: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime) -> Event:
    counts = stage_counts(r, cells, policy, now)[r.stage]
    return RolloutProgressed(
        at=now, version=r.version, state=r.state, stage=r.stage, wave=r.wave, counts=counts
    )


def _soak(policy: RolloutPolicy, stage: Stage) -> float:
    return float(getattr(policy.soak_seconds, stage))


class _Stepper:
    """One step of one rollout: a small state machine over an immutable Rollout."""

    def __init__(
        self, r: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime
    ) -> None:
        self.r = r
        self.by_id = {c.id: c for c in cells}
        self.policy = policy
        self.now = now
        self.assign: list[Assign] = []
        self.events: list[Event] = []

    @property
    def cells(self) -> list[CellFacts]:
        return list(self.by_id.values())

    def update(self, **changes: object) -> None:
        self.r = self.r.model_copy(update={**changes, "updated_at": self.now})

    def run(self) -> Decision:
        start = self.r
        for _ in range(2 * len(STAGE_ORDER) + 16):  # each pass moves a stage or a wave at most
            before = self.r
            self.one()
            if self.r == before:
                break
        quiet = any(isinstance(e, RolloutHalted | RolloutCompleted) for e in self.events)
        if self.r != start and not quiet:
            self.events.append(_progressed(self.r, self.cells, self.policy, self.now))
        return Decision(self.r, self.assign, self.events)

    def one(self) -> None:
        r = self.r
        if r.state == "aborted" and not r.reverted:
            self.revert()
        elif r.state == "soaking" and r.soak_until is not None and self.now >= r.soak_until:
            self.update(state="in_progress", soak_until=None)
            self.next_wave()
        elif r.state == "in_progress":
            if r.waves is None:
                self.start_stage()
            else:
                self.evaluate_wave()

    def revert(self) -> None:
        """Abort: a reversible release's cells go back to the release they had before."""
        if self.r.reversible:
            for cell in self.cells:
                sent = cell.desired_generation is not None
                if (
                    sent
                    and cell.desired_version == self.r.version
                    and cell.status != "decommissioned"
                ):
                    self.assign.append(
                        Assign(cell.id, cell.previous_version, cell.installed_release)
                    )
        self.update(reverted=True)

    def start_stage(self) -> None:
        r, policy = self.r, self.policy
        members = [
            c for c in self.cells if c.stage == r.stage and c.status in ("online", "offline")
        ]
        progress = {c.id: cell_progress(c, r.version, policy, self.now) for c in members}
        needing = [c for c in members if progress[c.id] in ("pending", "offline", "in_progress")]
        if policy.offline_cells == "skip":
            targets = [c.id for c in needing if c.status == "online"]
        else:
            targets = [c.id for c in needing]
        if needing and not [c for c in needing if c.status == "online"]:
            self.halt(f"no reachable cell in stage {r.stage}: all {len(needing)} are offline", ())
            return
        if not targets:
            # Nothing to update here; nothing to bake either.
            self.update(waves=(), wave=0, reached=_add(r.reached, r.stage))
            self.next_stage()
            return
        if r.stage == "dedicated":
            waves = tuple(tuple(w) for w in split_waves(targets, r.version, policy.waves))
        else:
            waves = (tuple(sorted(targets)),)
        self.update(waves=waves, wave=0, wave_started_at=self.now)
        self.evaluate_wave()

    def evaluate_wave(self) -> None:
        r, policy = self.r, self.policy
        assert r.waves is not None
        wave = r.waves[r.wave] if r.wave < len(r.waves) else ()
        waiting = False
        failures: list[CellFailure] = []
        deadline = timedelta(seconds=policy.progress_deadline_seconds)
        for cell_id in wave:
            cell = self.by_id.get(cell_id)
            if cell is None:
                continue
            progress = cell_progress(cell, r.version, policy, self.now)
            if progress == "pending":
                self.send(cell, r.version)
                waiting = True
            elif progress == "in_progress":
                waiting = True
            elif progress == "offline" and policy.offline_cells == "wait":
                started = r.wave_started_at or self.now
                if self.now - started > deadline:
                    progress = "timed_out"
                    failures.append(
                        CellFailure(cell_id=cell_id, error=failure_of(cell, "offline", policy))
                    )
                else:
                    waiting = True
            counted = cell_id in r.accepted or any(f.cell_id == cell_id for f in failures)
            if progress in ("failed", "timed_out") and not counted:
                failures.append(
                    CellFailure(cell_id=cell_id, error=failure_of(cell, progress, policy))
                )
        if len(failures) > policy.failure_threshold:
            label = (
                "canary"
                if r.stage == "dedicated" and r.wave == 0 and policy.waves.canary
                else f"wave {r.wave + 1}"
            )
            self.halt(
                f"{len(failures)} cell(s) failed in {r.stage} {label}"
                f" (the wave tolerates {policy.failure_threshold})",
                tuple(failures),
            )
        elif not waiting:
            self.wave_done()

    def send(self, cell: CellFacts, version: str) -> None:
        self.assign.append(Assign(cell.id, version, cell.installed_release))
        cell = cell.model_copy(
            update={
                "desired_version": version,
                "desired_generation": -1,  # a real one is given when written
                "desired_at": self.now,
                "previous_version": cell.installed_release,
            }
        )
        self.by_id[cell.id] = cell

    def halt(self, reason: str, failures: tuple[CellFailure, ...]) -> None:
        r = self.r
        self.update(state="halted", halt=Halt(reason=reason, failures=failures))
        self.events.append(
            RolloutHalted(
                at=self.now, version=r.version, stage=r.stage, wave=r.wave, reason=reason,
                failures=failures,
            )
        )  # fmt: skip

    def wave_done(self) -> None:
        r = self.r
        self.update(reached=_add(r.reached, r.stage))
        assert r.waves is not None
        last_stage = r.stage == STAGE_ORDER[-1]
        last_wave = r.wave + 1 >= len(r.waves)
        soak = _soak(self.policy, r.stage)
        if last_stage and last_wave:
            self.update(state="completed")
            self.events.append(RolloutCompleted(at=self.now, version=r.version))
            self.events.append(_progressed(self.r, self.cells, self.policy, self.now))
        elif soak > 0:
            self.update(state="soaking", soak_until=self.now + timedelta(seconds=soak))
        else:
            self.next_wave()

    def next_wave(self) -> None:
        r = self.r
        if r.waves is not None and r.wave + 1 < len(r.waves):
            self.update(wave=r.wave + 1, wave_started_at=self.now)
        else:
            self.next_stage()

    def next_stage(self) -> None:
        r = self.r
        index = STAGE_ORDER.index(r.stage)
        if index + 1 >= len(STAGE_ORDER):
            self.update(state="completed")
            self.events.append(RolloutCompleted(at=self.now, version=r.version))
            self.events.append(_progressed(self.r, self.cells, self.policy, self.now))
            return
        self.update(stage=STAGE_ORDER[index + 1], waves=None, wave=0, wave_started_at=None)


def _add(stages: tuple[Stage, ...], stage: Stage) -> tuple[Stage, ...]:
    return stages if stage in stages else (*stages, stage)


def step(r: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime) -> Decision:
    """What the controller does next for one rollout: the rollout's new state, the desired
    states to send and the events to announce. Calling it again with the result changes
    nothing, so a step that was written is never repeated and one that was not is redone."""
    return _Stepper(r, cells, policy, now).run()


def superseded(rollouts: list[Rollout]) -> list[str]:
    """Active rollouts that a newer release has caught up with: once a newer release has
    started the stage an older one is in, the older one stops and the newer carries on."""
    out = []
    for old in rollouts:
        if old.state not in ACTIVE:
            continue
        for new in rollouts:
            if new.state in ("aborted",) or not new.semver > old.semver:
                continue
            if new.state == "completed" or STAGE_ORDER.index(new.stage) >= STAGE_ORDER.index(
                old.stage
            ):
                out.append(old.version)
                break
    return out


class _Reach:
    """Which cells a rollout has reached, for many cells (its wave sets computed once)."""

    def __init__(self, r: Rollout) -> None:
        self.r = r
        self.version = r.version
        self.started = r.started_cells()
        self.waiting = r.waiting_cells()

    def reaches(self, cell: CellFacts) -> bool:
        """The cell's stage is past, or its wave has started, or (a cell that was in no wave)
        its stage's first wave is done. A halted, paused or aborted rollout reaches no one."""
        r = self.r
        if r.state == "completed":
            return True
        if r.state not in ("in_progress", "soaking", "superseded"):
            return False
        mine, theirs = STAGE_ORDER.index(cell.stage), STAGE_ORDER.index(r.stage)
        if mine != theirs:
            return mine < theirs
        if cell.id in self.started:
            return True
        if cell.id in self.waiting:
            return False
        return cell.stage in r.reached


def catch_up(cells: list[CellFacts], rollouts: list[Rollout]) -> list[Assign]:
    """Desired states for reachable cells that no wave is taking care of: a newly registered
    cell's first install, a cell back from offline or from an infrastructure hold, and a
    pinned cell's pin. A cell only ever moves forward here."""
    newest_first_rollouts = [
        _Reach(r) for r in sorted(rollouts, key=lambda r: r.semver, reverse=True)
    ]
    out = []
    for cell in cells:
        if cell.status != "online" or cell.held:
            continue
        if cell.pinned is not None:
            target: str | None = cell.pinned
            if cell.installed_release == target or (
                cell.desired_generation is not None and cell.desired_version == target
            ):
                continue
        else:
            target = next((r.version for r in newest_first_rollouts if r.reaches(cell)), None)
            if target is None or at_least(cell.installed_release, target):
                continue
            if cell.desired_generation is not None and at_least(cell.desired_version, target):
                continue  # on its way there, or it failed there and waits for a newer release
        out.append(Assign(cell.id, target, cell.installed_release))
    return out


# -- operator actions -----------------------------------------------------------------------------


class ActionRefused(Exception):
    """An operator action that does not apply to the rollout's state (the message says why)."""


def pause(r: Rollout, now: datetime) -> Rollout:
    if r.state not in ("in_progress", "soaking"):
        raise ActionRefused(f"rollout {r.version} is {r.state}; only a running one can be paused")
    return r.model_copy(update={"state": "paused", "updated_at": now})


def resume(r: Rollout, now: datetime) -> Rollout:
    """Continue a paused or halted rollout. Resuming a halt accepts its failed cells (they stay
    on the release they are on) and goes on with the next wave; a stage halted for having no
    reachable cell is passed, and its cells get the release when they return."""
    if r.state == "paused":
        state: RolloutState = "soaking" if r.soak_until is not None else "in_progress"
        return r.model_copy(update={"state": state, "updated_at": now})
    if r.state != "halted":
        raise ActionRefused(
            f"rollout {r.version} is {r.state}; only a paused or halted one resumes"
        )
    accepted = r.accepted + tuple(f.cell_id for f in (r.halt.failures if r.halt else ()))
    waves = r.waves if r.waves is not None else ()
    return r.model_copy(
        update={"state": "in_progress", "halt": None, "accepted": accepted, "waves": waves,
                "updated_at": now}
    )  # fmt: skip


def abort(r: Rollout, now: datetime) -> Rollout:
    if r.state not in ACTIVE:
        raise ActionRefused(f"rollout {r.version} is {r.state}; there is nothing to abort")
    return r.model_copy(update={"state": "aborted", "reverted": False, "updated_at": now})


# -- explaining a cell ----------------------------------------------------------------------------

ExplainReason = Literal[
    "up_to_date", "in_progress", "failed", "waiting_for_stage", "waiting_for_wave", "offline",
    "pinned", "held", "halted", "paused", "not_registered", "decommissioned", "no_release",
]  # fmt: skip


def explain(
    cell: CellFacts, rollouts: list[Rollout], policy: RolloutPolicy, now: datetime
) -> tuple[ExplainReason, str, str | None]:
    """Why ``cell`` is (or is not) on the newest release: a reason, a sentence, and the release
    the answer is about."""
    live = sorted((r for r in rollouts if r.state != "aborted"), key=lambda r: r.semver)
    if cell.status == "decommissioned":
        return "decommissioned", f"{cell.id} is decommissioned and gets no releases.", None
    if cell.status == "created":
        return (
            "not_registered",
            f"{cell.id} has not registered yet; its agent has not connected.",
            None,
        )
    if not live:
        return "no_release", "No release has been published (or every one was aborted).", None
    newest = live[-1]
    v = newest.version
    installed = cell.installed_release or "nothing"
    if cell.pinned is not None:
        return (
            "pinned",
            f"{cell.id} is pinned to {cell.pinned} by an operator (`cells unpin` releases it).",
            v,
        )
    if at_least(cell.installed_release, v):
        return "up_to_date", f"{cell.id} runs {installed}, the newest release.", v
    if cell.held:
        return (
            "held",
            (
                f"{cell.id} is held: its infrastructure template is past its deadline, so it"
                " gets no application update until the new template is applied."
            ),
            v,
        )
    in_flight = cell.desired_version if cell.desired_generation is not None else None
    if in_flight is not None and not at_least(cell.installed_release, in_flight):
        progress = cell_progress(cell, in_flight, policy, now)
        if progress in ("failed", "timed_out"):
            return (
                "failed",
                (
                    f"Updating {cell.id} to {in_flight} failed"
                    f" ({failure_of(cell, progress, policy)});"
                    f" it runs {installed} and waits for a newer release or an operator."
                ),
                in_flight,
            )
        if progress == "in_progress":
            return "in_progress", f"{cell.id} is being updated to {in_flight}.", in_flight
    if cell.status == "offline":
        return "offline", f"{cell.id} is offline; it is updated when it comes back.", v
    if newest.state in ("halted", "paused"):
        why = f": {newest.halt.reason}" if newest.halt else ""
        reason: ExplainReason = "halted" if newest.state == "halted" else "paused"
        return reason, f"The rollout of {v} is {newest.state}{why}.", v
    mine, theirs = STAGE_ORDER.index(cell.stage), STAGE_ORDER.index(newest.stage)
    if mine > theirs or (
        mine == theirs
        and newest.state == "soaking"
        and cell.id not in newest.started_cells()
        and cell.stage not in newest.reached
    ):
        soak = f", soaking until {newest.soak_until.isoformat()}" if newest.soak_until else ""
        return (
            "waiting_for_stage",
            (
                f"{v} is in stage {newest.stage}{soak}; {cell.id} is in {cell.stage},"
                " which comes later."
            ),
            v,
        )
    if cell.id in newest.waiting_cells():
        waves = newest.waves or ()
        n = next(i for i, w in enumerate(waves) if cell.id in w)
        return (
            "waiting_for_wave",
            (
                f"{v} is in {newest.stage} wave {newest.wave + 1} of {len(waves)};"
                f" {cell.id} is in wave {n + 1}."
            ),
            v,
        )
    return "in_progress", f"{cell.id} is due to get {v} on the controller's next step.", v
