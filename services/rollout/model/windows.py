"""Which cells wait before a release reaches them: for their maintenance window, or for the
end of their customer's deferral.

A release whose components require maintenance (or, with the policy's ``window_releases:
all_to_dedicated``, any release to a dedicated cell) is sent to a cell that has windows only
while one is open; a cell without windows is not held. Nothing here holds a rollback (an abort
sends cells back at once) or a pin an operator set.

A cell whose customer deferred updates gets no release until the deferral ends, unless the
release's deadline (a security release's, or an SLA) has passed; a wave does not wait for a
deferred cell (it catches up once the deferral ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from common.windows import WindowSet
from services.rollout.model.cells import CellFacts
from services.rollout.model.rollout import Rollout


@dataclass
class Windows:
    by_cell: dict[str, WindowSet] = field(default_factory=dict)
    by_org: dict[str, WindowSet] = field(default_factory=dict)
    # Releases whose components require maintenance.
    maintenance: frozenset[str] = frozenset()
    all_to_dedicated: bool = False
    # Release -> its deadline: past it, no deferral holds it.
    deadlines: dict[str, datetime] = field(default_factory=dict)
    # Sends this step held back for a window or a deferral: the step must be taken again as
    # time passes.
    withheld: int = 0

    @classmethod
    def of(
        cls, sets: dict[str, WindowSet], rollouts: list[Rollout], *, all_to_dedicated: bool
    ) -> Windows:
        """From the stored sets (keys ``cell:<id>`` and ``org:<org>``) and the rollouts."""
        return cls(
            by_cell={k.removeprefix("cell:"): v for k, v in sets.items() if k.startswith("cell:")},
            by_org={k.removeprefix("org:"): v for k, v in sets.items() if k.startswith("org:")},
            maintenance=frozenset(r.version for r in rollouts if r.requires_maintenance),
            all_to_dedicated=all_to_dedicated,
            deadlines={r.version: r.deadline for r in rollouts if r.deadline is not None},
        )

    def set_of(self, cell: CellFacts) -> WindowSet | None:
        own = self.by_cell.get(cell.id)
        return own if own is not None else self.by_org.get(cell.org or "")

    def needed(self, cell: CellFacts, version: str) -> bool:
        return version in self.maintenance or (self.all_to_dedicated and cell.stage == "dedicated")

    def opens(self, cell: CellFacts, version: str, now: datetime) -> datetime | None:
        """When the cell's window opens, if ``version`` must wait for it; None if it need
        not wait (no window needed, none set, or one open now)."""
        if not self.needed(cell, version):
            return None
        windows = self.set_of(cell)
        if windows is None or windows.is_open(now):
            return None
        return windows.next_open(now)

    def deferred(self, cell: CellFacts, version: str, now: datetime) -> bool:
        """Whether the cell's customer has deferred ``version`` (its deadline not yet past)."""
        if cell.deferred_until is None or now >= cell.deferred_until:
            return False
        deadline = self.deadlines.get(version)
        return deadline is None or now < deadline

    def hold(self, cell: CellFacts, version: str, now: datetime) -> bool:
        """Whether to hold the send of ``version`` to ``cell`` now (counted as withheld)."""
        if self.opens(cell, version, now) is None and not self.deferred(cell, version, now):
            return False
        self.withheld += 1
        return True
