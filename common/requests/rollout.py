"""The rollout service's methods: releases, their rollouts, the policy, pins, and why a cell is
where it is. The release file and the policy file are the requests' own schemas."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from common.fields import Digest
from common.health import Check, HealthFile
from common.messages import CellFailure
from common.releases import Component, Release
from common.requests import Request, Response, ServiceStatus, rpc
from common.versions import SemVerText
from common.vocabulary import (
    STAGES,
    CellStatus,
    ExplainReason,
    RolloutState,
    SkipReason,
    Stage,
)
from common.windows import WindowSet

# -- the release file -----------------------------------------------------------------------------


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
    # Checks the agent runs after applying it, during a bake and a watch (common/health.py).
    health: HealthFile | None = None
    # A cell behind a required release installs it before anything newer (an upgrade path).
    required: bool = False
    # A security release, and a deadline (an SLA): no customer's deferral holds a cell past it.
    security: bool = False
    deadline: AwareDatetime | None = None

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
            health=self.health.wire() if self.health else None,
            required=self.required,
            security=self.security,
            deadline=self.deadline,
        )


# -- the policy file ------------------------------------------------------------------------------


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


class SoakTimes(BaseModel):
    """Seconds a release bakes after a stage before the next one starts. For ``dedicated`` it is
    the bake between waves (after the canary, after each wave); after the last wave the
    rollout is complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    staging: float = Field(default=1800, ge=0)
    saas: float = Field(default=3600, ge=0)
    dedicated: float = Field(default=1800, ge=0)

    def of(self, stage: Stage) -> float:
        return float(getattr(self, stage))


_PERCENT = re.compile(r"^([0-9]{1,3}(?:\.[0-9]+)?)%$")


class StagePolicy(BaseModel):
    """How a stage judges a release by its cells' health verdicts (common/health.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # How long a cell checks its health after applying before its verdict, and how long it
    # keeps checking after a healthy one (a lasting breach then still counts against the
    # release). A release's own ``health.bake_seconds``/``watch_seconds`` take precedence.
    bake_seconds: float = Field(default=0, ge=0, le=7 * 86400)
    watch_seconds: float = Field(default=0, ge=0, le=7 * 86400)
    # Failed or unhealthy cells the stage tolerates, as a count ("2") or a share of the
    # stage's cells in the rollout ("10%", rounded down); one more halts the rollout. None:
    # the policy's ``failure_threshold``.
    failure_budget: int | str | None = None
    # An inconclusive verdict: pause the rollout for an operator, or count it as failed.
    inconclusive: Literal["pause", "fail"] = "pause"
    # At most this many cells of the stage updating (sent, no verdict yet) at once.
    max_updating: int | None = Field(default=None, ge=1)

    @field_validator("failure_budget")
    @classmethod
    def _count_or_share(cls, budget: int | str | None) -> int | str | None:
        if isinstance(budget, int):
            if budget < 0:
                raise ValueError("a failure budget is a count of at least 0 or a share like '10%'")
            return budget
        if isinstance(budget, str):
            match = _PERCENT.fullmatch(budget.strip())
            if match is None or float(match.group(1)) > 100:
                raise ValueError(f"{budget!r} is neither a count nor a share from '0%' to '100%'")
            return budget.strip()
        return budget

    def allowed(self, cells: int, threshold: int) -> int:
        """Failures the budget lets through over a stage of ``cells`` cells."""
        if self.failure_budget is None:
            return threshold
        if isinstance(self.failure_budget, int):
            return self.failure_budget
        share = float(self.failure_budget.rstrip("%"))
        return math.floor(cells * share / 100 + 1e-9)


class StagePolicies(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    staging: StagePolicy = Field(default_factory=StagePolicy)
    saas: StagePolicy = Field(default_factory=StagePolicy)
    dedicated: StagePolicy = Field(default_factory=StagePolicy)

    def of(self, stage: Stage) -> StagePolicy:
        policy: StagePolicy = getattr(self, stage)
        return policy


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
    # Per stage: bake, watch, failure budget, inconclusive verdicts, cells updating at once.
    stages: StagePolicies = Field(default_factory=StagePolicies)
    # Checks for a release that declares none (common/health.py).
    health_checks: list[Check] = Field(default_factory=list, max_length=32)
    # A cell whose install failed with nothing changed (images not found, say) outside any
    # wave is sent the release again after this long, until it installs.
    retry_failed_seconds: float = Field(default=300, gt=0)
    # Stages a release enters only once an operator other than its publisher approved it
    # (`rollout approve`): the two-person rule, e.g. [dedicated].
    approval_stages: list[Stage] = Field(default_factory=list, max_length=len(STAGES))
    # Which releases wait for a cell's maintenance window (`substratectl windows`): those
    # whose components require maintenance, or also every release to a dedicated cell.
    window_releases: Literal["requires_maintenance", "all_to_dedicated"] = "requires_maintenance"
    # A customer may defer their cell's updates (cell-agent defer) for at most this long; a
    # security release goes through a deferral this long after it is published.
    max_deferral_days: float = Field(default=7, gt=0, le=90)
    security_deadline_days: float = Field(default=2, ge=0, le=90)

    def default_checks(self) -> tuple[dict[str, Any], ...]:
        return tuple(c.model_dump(exclude_none=True) for c in self.health_checks)


# -- responses ------------------------------------------------------------------------------------


class ReleaseSummary(Response):
    version: str
    components: int
    requires_maintenance: bool
    reversible: bool
    published_at: str
    published_by: str


class ReleaseRecord(ReleaseSummary):
    release: Release


class Plan(Response):
    version: str
    stages: dict[str, list[list[str]]]
    skipped: dict[str, SkipReason]
    # Cells behind a required release: the releases each installs on the way, in order.
    paths: dict[str, list[str]] = Field(default_factory=dict)
    # A dry run of a release file: why publishing it would be refused (None: it would not).
    refused: str | None = None
    # The health checks its cells would run (names) and the bake per stage.
    checks: list[str] = Field(default_factory=list)
    bake_seconds: dict[str, float] = Field(default_factory=dict)
    # Cells that wait for their maintenance window for this release: when it opens next
    # (no sooner than that is it sent them; waves, soaks and bakes may make it later).
    not_before: dict[str, str] = Field(default_factory=dict)
    # When each cell would be sent it if the rollout started now and every cell applied it at
    # once (model/plan.py predict); cells of a stage waiting for approval, and after, have none.
    predicted: dict[str, str] = Field(default_factory=dict)
    # The first stage whose start waits for an approval (the prediction stops there).
    waits_for_approval: str | None = None


class Halt(BaseModel):
    model_config = ConfigDict(frozen=True)

    reason: str
    failures: tuple[CellFailure, ...] = ()


class StageCounts(Response):
    """A stage's cells for one release (decommissioned cells not counted)."""

    total: int = 0
    updated: int = 0
    in_progress: int = 0
    failed: int = 0
    inconclusive: int = 0
    offline: int = 0
    held: int = 0
    pinned: int = 0
    pending: int = 0


class RolloutView(Response):
    version: str
    state: RolloutState
    stage: Stage
    # 1-based for people: "wave 2 of 4"; the canary is wave 1 when there is one.
    wave: int | None
    waves: int
    soak_until: str | None
    halt: Halt | None
    reversible: bool
    started_at: str
    updated_at: str
    stages: dict[Stage, StageCounts]
    # Why the current stage has not started: the approval or the start time it waits for.
    waiting: str | None = None
    published_by: str = ""
    # Stage -> the operator who approved the release into it.
    approved: dict[str, str] = Field(default_factory=dict)
    # Stage -> when it starts (a scheduled start).
    starts_at: dict[str, str] = Field(default_factory=dict)
    # Cells whose customer deferred updates, and until when (this release's deadline, if it
    # has one, overrides a deferral once it has passed).
    deferred: dict[str, str] = Field(default_factory=dict)
    deadline: str | None = None
    # When the counts were taken: the leading controller's last step that changed them (it
    # keeps them as cells change), or the moment of the request when none leads.
    counted_at: str | None = None


class Explanation(Response):
    cell: str
    stage: Stage
    status: CellStatus
    reason: ExplainReason
    explanation: str
    release: str | None
    installed_release: str | None
    desired_release: str | None
    desired_generation: int | None
    pinned: str | None
    held: bool
    hold_deadline: str | None = None


class Pin(Response):
    cell: str
    pinned: str | None
    installed_release: str | None


class RolloutServiceStatus(ServiceStatus):
    releases: int
    active: list[str]
    halted: list[str]


# -- methods --------------------------------------------------------------------------------------


@rpc("rollout", "release.publish")
class ReleasePublish(Request[ReleaseRecord]):
    """Publish a release once per version; publishing starts its rollout."""

    release: ReleaseFile
    # The rollout's first stage starts no earlier than this (None: at once).
    starts_at: AwareDatetime | None = None


@rpc("rollout", "release.list", read_only=True)
class ReleaseList(Request[list[ReleaseSummary]]):
    pass


@rpc("rollout", "release.show", read_only=True)
class ReleaseShow(Request[ReleaseRecord]):
    version: str


@rpc("rollout", "rollout.plan", read_only=True)
class RolloutPlan(Request[Plan]):
    """Dry run: which cells a release would reach in which stage and wave (nothing is sent);
    with ``release``, a release file not yet published (``release publish --dry-run``)."""

    version: str
    release: ReleaseFile | None = None


@rpc("rollout", "rollout.status", read_only=True)
class RolloutShow(Request[RolloutView]):
    """One rollout; with no version, the newest release's."""

    version: str | None = None


@rpc("rollout", "rollout.list", read_only=True)
class RolloutList(Request[list[RolloutView]]):
    pass


@rpc("rollout", "rollout.pause")
class RolloutPause(Request[RolloutView]):
    version: str


@rpc("rollout", "rollout.resume")
class RolloutResume(Request[RolloutView]):
    version: str


@rpc("rollout", "rollout.abort")
class RolloutAbort(Request[RolloutView]):
    version: str


@rpc("rollout", "rollout.explain", read_only=True)
class RolloutExplain(Request[Explanation]):
    id: str


@rpc("rollout", "rollout.policy.show", read_only=True)
class PolicyShow(Request[RolloutPolicy]):
    pass


@rpc("rollout", "rollout.policy.set", role="admin")
class PolicySet(Request[RolloutPolicy]):
    """Replace the policy (keys left out take their defaults)."""

    policy: RolloutPolicy


@rpc("rollout", "cells.pin")
class CellsPin(Request[Pin]):
    id: str
    version: str


@rpc("rollout", "cells.unpin")
class CellsUnpin(Request[Pin]):
    id: str


@rpc("rollout", "rollout.approve")
class RolloutApprove(Request[RolloutView]):
    """Let a release into a stage the policy keeps it out of until a second operator (not its
    publisher) approves; by default the stage it waits at."""

    version: str
    stage: Stage | None = None


@rpc("rollout", "rollout.promote")
class RolloutPromote(Request[RolloutView]):
    """Skip the rest of the current soak; the reason goes into the audit log."""

    version: str
    reason: str = Field(min_length=1, max_length=300)


@rpc("rollout", "rollout.retry")
class RolloutRetry(Request[RolloutView]):
    """Send the release again to the cells whose update failed."""

    version: str


@rpc("rollout", "rollout.schedule")
class RolloutSchedule(Request[RolloutView]):
    """A stage starts no earlier than ``at`` (None: clears its start time)."""

    version: str
    stage: Stage
    at: AwareDatetime | None


class WindowsEntry(Response):
    owner: str  # cell:<id> or org:<org>
    windows: WindowSet
    open_now: bool
    next_open: str


class _Owner(BaseModel):
    """Exactly one of a cell or an org."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cell: str | None = Field(default=None, max_length=64)
    org: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _one(self) -> _Owner:
        if (self.cell is None) == (self.org is None):
            raise ValueError("give exactly one of cell or org")
        return self

    def owner(self) -> str:
        return f"cell:{self.cell}" if self.cell is not None else f"org:{self.org}"


@rpc("rollout", "windows.set")
class WindowsSet(_Owner, Request[WindowsEntry]):
    """A cell's or an org's maintenance windows, replacing any it had."""

    windows: WindowSet


@rpc("rollout", "windows.clear")
class WindowsClear(_Owner, Request[WindowsEntry]):
    pass


@rpc("rollout", "windows.list", read_only=True)
class WindowsList(Request[list[WindowsEntry]]):
    pass
