"""The rollout service's decisions, pure: what a release file must contain, and which cells a
release reaches in which stage and wave."""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from common.messages import Component, Digest, Release, Stage
from common.versions import SemVer, version_problem


def _semver(value: str) -> str:
    problem = version_problem(value)
    if problem:
        raise ValueError(problem)
    return value


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

    version: Annotated[str, AfterValidator(_semver)]
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
    """What rollout knows of a cell, from the registry's events and the cell's reports."""

    model_config = ConfigDict(frozen=True)

    id: str
    stage: Stage
    status: Literal["created", "online", "offline", "decommissioned"]
    installed_release: str | None = None
    pinned: str | None = None
    held: bool = False


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
