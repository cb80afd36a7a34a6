"""The rollout service's decisions, pure. So far: what a release file must contain."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from common.messages import Component, Digest, Release
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
