"""What rollout knows of a cell, and where a cell stands with respect to one release."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Literal

from common.requests.rollout import RolloutPolicy
from common.versions import SemVer
from common.vocabulary import FAILED_PHASES, CellStatus, Stage


@dataclass(frozen=True, slots=True)
class CellFacts:
    """What rollout knows of a cell: its facts from the fleet view (common.fleet), and the
    desired state rollout last sent it, with the cell's last report on it.

    A plain slotted record, not a pydantic model: the controller holds one per cell of the
    fleet, and at 100,000 cells a model each was 3.5 KB a cell and most of a reload's time.
    Only the store builds them, from what the fleet view and rollout's own writes hold."""

    id: str
    stage: Stage
    status: CellStatus
    org: str | None = None
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
    # Set when the desired state is a step on an upgrade path: the release it leads to.
    desired_for: str | None = None
    # The bake the desired state asked for (None: no health checks, the outcome decides).
    desired_bake: float | None = None
    # The cell's last upgrade report, and its health verdict.
    report_generation: int | None = None
    report_phase: str | None = None
    report_error: str | None = None
    report_verdict: str | None = None
    report_check: str | None = None
    report_at: datetime | None = None
    # The agent's incarnation (a re-bootstrapped cell has a new one, and nothing it was sent).
    incarnation: str | None = None
    # The customer deferred updates until then (cell-agent defer), and why.
    deferred_until: datetime | None = None
    deferral_reason: str | None = None


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
    "inconclusive",
    "timed_out",
    "superseded",
    "pinned",
    "held",
    "offline",
    "pending",
    "not_registered",
    "decommissioned",
]

# How each progress is counted in a stage's counts (common.requests.rollout.StageCounts);
# decommissioned cells are not counted.
COUNT_KEYS = (
    "total", "updated", "in_progress", "failed", "inconclusive", "offline", "held", "pinned",
    "pending",
)  # fmt: skip
BUCKET: dict[str, str] = {
    "updated": "updated",
    "in_progress": "in_progress",
    "superseded": "in_progress",
    "failed": "failed",
    "timed_out": "failed",
    "inconclusive": "inconclusive",
    "offline": "offline",
    "held": "held",
    "pinned": "pinned",
    "pending": "pending",
    "not_registered": "pending",
}


def cell_progress(
    cell: CellFacts, version: str, policy: RolloutPolicy, now: datetime
) -> CellProgress:
    """Where the cell stands with ``version``. A cell sent it is judged by its own report on
    what it was sent (never by a release it reports running: a cell that baked it and turned
    unhealthy runs it too); with health checks it counts as updated only once healthy, and
    without, running it is enough (its outcome report may have been missed)."""
    if cell.status == "decommissioned":
        return "decommissioned"
    if cell.status == "created":
        return "not_registered"
    sent = cell.desired_version
    if cell.desired_generation is not None and version in (sent, cell.desired_for):
        # Sent ``version``, or a step on its path to it (then done with the step: the next).
        done: CellProgress = "pending" if sent != version else "updated"
        if cell.report_generation == cell.desired_generation:
            judged = _judged(cell)
            if judged is not None:
                return done if judged == "updated" else judged
        if (
            cell.desired_bake is None
            and sent is not None
            and at_least(cell.installed_release, sent)
        ):
            return done  # its outcome report missed, but it runs the release
        deadline = policy.progress_deadline_seconds + (cell.desired_bake or 0.0)
        if cell.desired_at is not None and (now - cell.desired_at).total_seconds() > deadline:
            return "timed_out"
        return "in_progress"
    if at_least(cell.installed_release, version):
        return "updated"
    if cell.desired_generation is not None and newer(cell.desired_version, version):
        return "superseded"
    if cell.pinned is not None:
        return "pinned"
    if cell.held:
        return "held"
    if cell.status == "offline":
        return "offline"
    return "pending"


def _judged(cell: CellFacts) -> CellProgress | None:
    """The cell's report on the desired state it was sent, as progress (None: still going)."""
    if cell.report_phase in FAILED_PHASES or cell.report_verdict == "unhealthy":
        return "failed"
    if cell.report_phase != "succeeded":
        return None
    if cell.desired_bake is None or cell.report_verdict == "healthy":
        return "updated"
    if cell.report_verdict == "inconclusive":
        return "inconclusive"
    return None  # applied; baking


def failure_of(cell: CellFacts, progress: CellProgress, policy: RolloutPolicy) -> str:
    if progress in ("failed", "inconclusive") and cell.report_verdict is not None:
        check = f"check {cell.report_check}: " if cell.report_check else ""
        return f"{cell.report_verdict}: {check}{cell.report_error or 'no detail'}"
    if progress == "failed":
        return cell.report_error or f"upgrade {cell.report_phase}"
    if progress == "timed_out":
        return f"no outcome reported within {policy.progress_deadline_seconds:g}s"
    return f"offline for longer than the {policy.progress_deadline_seconds:g}s deadline"
