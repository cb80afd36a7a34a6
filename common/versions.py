"""Release versions are semantic versions (``2026.11.3``, ``2026.12.0-rc.1``). Ordering them is
shared by rollout (which release is newer) and the flags engine (minimum installed release)."""

from __future__ import annotations

import re
from functools import lru_cache, total_ordering
from typing import Annotated

from pydantic import AfterValidator

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)


@total_ordering
class SemVer:
    """A parsed semantic version, ordered by the semver precedence rules (build metadata is
    ignored; a pre-release sorts before its release)."""

    __slots__ = ("core", "pre", "text")

    def __init__(self, text: str, core: tuple[int, int, int], pre: tuple[str, ...]) -> None:
        self.text = text
        self.core = core
        self.pre = pre

    @classmethod
    def parse(cls, text: str | None) -> SemVer | None:
        """The version, or None if ``text`` is missing or not a semantic version."""
        return _parse(text) if text else None

    @classmethod
    def _parse(cls, text: str) -> SemVer | None:
        m = _SEMVER.match(text)
        if m is None:
            return None
        core = (int(m[1]), int(m[2]), int(m[3]))
        return cls(text, core, tuple(m[4].split(".")) if m[4] else ())

    def _key(self) -> tuple[tuple[int, int, int], int, tuple[tuple[int, int | str], ...]]:
        # A release (no pre-release) sorts after every pre-release of the same core.
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.pre)
        return self.core, 0 if self.pre else 1, pre

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"SemVer({self.text!r})"


def version_problem(text: str) -> str | None:
    if SemVer.parse(text) is None:
        return f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 2026.11.3)"
    return None


# A fleet has few distinct versions and the rollout controller compares them per cell per step;
# a SemVer never changes, so parses are shared.
@lru_cache(maxsize=4096)
def _parse(text: str) -> SemVer | None:
    return SemVer._parse(text)


def _semver_text(value: str) -> str:
    problem = version_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A field that must hold a semantic version (release files, flag version gates).
SemVerText = Annotated[str, AfterValidator(_semver_text)]
