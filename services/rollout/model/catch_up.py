"""Desired states for cells no wave is taking care of: a newly registered cell's first install,
a cell back from offline or from an infrastructure hold, and a pinned cell's pin."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from common.vocabulary import RUNNING_STATES, STAGES
from services.rollout.model.cells import CellFacts, at_least
from services.rollout.model.path import next_step
from services.rollout.model.rollout import Rollout
from services.rollout.model.step import Assign
from services.rollout.model.windows import Windows

_STAGE_INDEX = {stage: i for i, stage in enumerate(STAGES)}


class _Reach:
    """Which cells a rollout has reached, for many cells: everything that depends on the
    rollout alone is worked out once (this runs for every cell on every controller step)."""

    def __init__(self, r: Rollout) -> None:
        self.version = r.version
        # A halted, paused or aborted rollout reaches no one; a completed one everyone.
        self.everyone = r.state == "completed"
        self.no_one = not self.everyone and r.state not in (*RUNNING_STATES, "superseded")
        self.stage = _STAGE_INDEX[r.stage]
        self.stage_reached = r.stage in r.reached
        self.started = r.started_cells()
        self.waiting = r.waiting_cells()
        # The wave under way sends its own cells (as its stage's cap allows).
        waves = r.waves or ()
        self.current = (
            set(waves[r.wave]) if r.state == "in_progress" and r.wave < len(waves) else set()
        )

    def reaches(self, cell: CellFacts) -> bool:
        """The cell's stage is past, or its wave has started, or (a cell that was in no wave)
        its stage's first wave is done."""
        if self.everyone:
            return True
        if self.no_one:
            return False
        mine = _STAGE_INDEX[cell.stage]
        if mine != self.stage:
            return mine < self.stage
        if cell.id in self.current:
            return False
        if cell.id in self.started:
            return True
        if cell.id in self.waiting:
            return False
        return self.stage_reached


def _retry_due(
    cell: CellFacts, target: str, now: datetime | None, retry_seconds: float | None
) -> bool:
    """Whether the cell's install of ``target`` failed with nothing changed long enough ago
    to try again (a release that rolled back, or turned unhealthy, is never tried again)."""
    return (
        now is not None
        and retry_seconds is not None
        and cell.desired_version == target
        and failed_with_nothing_changed(cell)
        and cell.report_at is not None
        and (now - cell.report_at).total_seconds() >= retry_seconds
    )


def failed_with_nothing_changed(cell: CellFacts) -> bool:
    """The cell's install of what it was last sent failed before anything changed (it is
    tried again, so the time matters to a step while such a cell waits)."""
    return (
        cell.desired_generation is not None
        and cell.report_generation == cell.desired_generation
        and cell.report_phase == "failed"
        and cell.report_verdict is None
    )


def catch_up(
    cells: Iterable[CellFacts],
    rollouts: list[Rollout],
    now: datetime | None = None,
    retry_seconds: float | None = None,
    required: tuple[str, ...] = (),
    *,
    windows: Windows | None = None,
) -> list[Assign]:
    """Desired states for reachable cells that no wave is taking care of: a newly registered
    cell's first install, a cell back from offline or from an infrastructure hold, and a
    pinned cell's pin; and, ``retry_seconds`` after it reported it, a cell whose install
    failed with nothing changed (images not found, say) is sent the release again, so it
    installs once what it lacked exists. A cell behind a required release is sent that first
    (model/path.py). A release that needs a window reaches a cell inside it only
    (model/windows.py). A cell only ever moves forward here."""
    windows = windows or Windows()
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
            target = None
            for reach in newest_first_rollouts:
                if reach.reaches(cell):
                    target = reach.version
                    break
            if target is None or at_least(cell.installed_release, target):
                continue
            if (
                cell.desired_generation is not None
                and at_least(cell.desired_version, target)
                and not _retry_due(cell, target, now, retry_seconds)
            ):
                continue  # on its way there, or it failed there and waits for a newer release
            step = next_step(cell.installed_release, target, required)
            if (
                step != target
                and cell.desired_generation is not None
                and cell.desired_version == step
                and not _retry_due(cell, step, now, retry_seconds)
            ):
                continue  # on the step of its path it was sent, or failed there
            if now is not None and windows.hold(cell, step, now):
                continue  # outside its maintenance window; the window's opening sends it
            if step != target:
                out.append(
                    Assign(cell.id, step, cell.installed_release, cell.incarnation or "", target)
                )
                continue
        out.append(Assign(cell.id, target, cell.installed_release, cell.incarnation or ""))
    return out
