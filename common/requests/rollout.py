"""The rollout service's methods: releases, their rollouts, the policy, pins, and why a cell is
where it is. The release file and the policy file are the requests' own schemas."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.fields import Digest
from common.messages import CellFailure, Component, Release
from common.requests import Request, Response, ServiceStatus, rpc
from common.versions import SemVerText
from common.vocabulary import CellStatus, ExplainReason, RolloutState, SkipReason, Stage

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


@rpc("rollout", "release.list", read_only=True)
class ReleaseList(Request[list[ReleaseSummary]]):
    pass


@rpc("rollout", "release.show", read_only=True)
class ReleaseShow(Request[ReleaseRecord]):
    version: str


@rpc("rollout", "rollout.plan", read_only=True)
class RolloutPlan(Request[Plan]):
    """Dry run: which cells a release would reach in which stage and wave (nothing is sent)."""

    version: str


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


@rpc("rollout", "rollout.policy.set")
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
