"""Which cells wait for their maintenance window before a release reaches them.

A release whose components require maintenance (or, with the policy's ``window_releases:
all_to_dedicated``, any release to a dedicated cell) is sent to a cell that has windows only
while one is open; a cell without windows is not held. Nothing here holds a rollback (an abort
sends cells back at once) or a pin an operator set.
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
    # Sends this step held back for a window: the step must be taken again as time passes.
    withheld: int = 0

    @classmethod
    def of(
        cls, sets: dict[str, WindowSet], rollouts: list[Rollout], *, all_to_dedicated: bool
    ) -> Windows:
        """From the stored sets (keys ``cell:<id>`` and ``org:<org>``) and the rollouts."""
        return cls(
            by_cell={k[5:]: v for k, v in sets.items() if k.startswith("cell:")},
            by_org={k[4:]: v for k, v in sets.items() if k.startswith("org:")},
            maintenance=frozenset(r.version for r in rollouts if r.requires_maintenance),
            all_to_dedicated=all_to_dedicated,
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

    def hold(self, cell: CellFacts, version: str, now: datetime) -> bool:
        """Whether to hold the send of ``version`` to ``cell`` now (counted as withheld)."""
        if self.opens(cell, version, now) is None:
            return False
        self.withheld += 1
        return True


NO_WINDOWS = Windows()
