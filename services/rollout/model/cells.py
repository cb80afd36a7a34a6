"""What rollout knows of a cell, and where a cell stands with respect to one release."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict

from common.requests.rollout import RolloutPolicy
from common.versions import SemVer
from common.vocabulary import FAILED_PHASES, CellStatus, Stage


class CellFacts(BaseModel):
    """What rollout knows of a cell: its facts from the fleet view (common.fleet), and the
    desired state rollout last sent it, with the cell's last report on it."""

    model_config = ConfigDict(frozen=True)

    id: str
    stage: Stage
    status: CellStatus
    installed_release: str | None = None
    pinned: str | None = None
    held: bool = False
    # When it was due to apply the infrastructure template it is held for (ISO 8601).
    hold_deadline: str | None = None
    # The desired state last sent (generation None: never sent one; version None: nothing).
    desired_version: str | None = None
    desired_generation: int | None = None
    desired_at: datetime | None = None
    previous_version: str | None = None
    # The cell's last upgrade report.
    report_generation: int | None = None
    report_phase: str | None = None
    report_error: str | None = None


# The controller compares a fleet's few versions for every cell on every step.
@lru_cache(maxsize=4096)
def newer(a: str | None, b: str | None) -> bool:
    """Whether release ``a`` is newer than ``b`` (nothing is older than everything)."""
    pa, pb = SemVer.parse(a), SemVer.parse(b)
    if pa is None:
        return False
    return pb is None or pa > pb


def at_least(a: str | None, b: str) -> bool:
    return a is not None and (a == b or newer(a, b))


def newest_first(versions: list[str]) -> list[str]:
    """Semantic-version order, newest first (unparseable ones last, as stored)."""
    good = [(parsed, v) for v in versions if (parsed := SemVer.parse(v)) is not None]
    good.sort(key=lambda pair: pair[0], reverse=True)
    return [v for _, v in good] + [v for v in versions if SemVer.parse(v) is None]


CellProgress = Literal[
    "updated",
    "in_progress",
    "failed",
    "timed_out",
    "superseded",
    "pinned",
    "held",
    "offline",
    "pending",
    "not_registered",
    "decommissioned",
]


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
            if cell.report_phase in FAILED_PHASES:
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
