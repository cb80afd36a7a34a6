"""Upgrade paths: a release marked ``required`` is installed by every cell behind it before
anything newer, so a cell returning after weeks walks the path one verified step at a time
(each step judged by its own outcome and health verdict before the next is sent)."""

from __future__ import annotations

from collections.abc import Sequence

from common.versions import SemVer
from services.rollout.model.cells import newer
from services.rollout.model.rollout import Rollout


def required_versions(rollouts: Sequence[Rollout]) -> tuple[str, ...]:
    """The required releases (an aborted one is no step), oldest first."""
    found = [r for r in rollouts if r.required and r.state != "aborted"]
    return tuple(r.version for r in sorted(found, key=lambda r: r.semver))


def path(installed: str | None, target: str, required: Sequence[str]) -> list[str]:
    """The releases a cell on ``installed`` installs on its way to ``target``, in order."""
    if SemVer.parse(target) is None:
        return [target]
    steps = [v for v in required if newer(v, installed) and newer(target, v)]
    return [*steps, target]


def next_step(installed: str | None, target: str, required: Sequence[str]) -> str:
    return path(installed, target, required)[0]
