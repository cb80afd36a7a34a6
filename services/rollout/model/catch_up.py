"""Desired states for cells no wave is taking care of: a newly registered cell's first install,
a cell back from offline or from an infrastructure hold, and a pinned cell's pin."""

from __future__ import annotations

from common.vocabulary import RUNNING_STATES, STAGES
from services.rollout.model.cells import CellFacts, at_least
from services.rollout.model.rollout import Rollout
from services.rollout.model.step import Assign


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
        if r.state not in (*RUNNING_STATES, "superseded"):
            return False
        mine, theirs = STAGES.index(cell.stage), STAGES.index(r.stage)
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
