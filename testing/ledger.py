"""The ledger every fault test ends with: each confirmed command is classified as applied, lost
or applied twice, from what the cells themselves recorded (their apply logs), never from what
the control plane believes. Duplicate *deliveries* are allowed; a second *application* is not.

An agent under test runs with ``CELL_APPLIER=command`` and :data:`APPLY_COMMAND`, which appends
one line per applied component to ``applied.log`` in its state directory.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

APPLY_LOG = "applied.log"
# Cells in the rollout a broker or Redis fault lands in: a few in make test, more under make
# chaos.
CELLS = int(os.environ.get("SUBSTRATE_FAULT_CELLS", "4"))
# Run by the agent's command applier, once per component it applies (the delay keeps a rollout in
# flight long enough for a fault to land in the middle of it).
APPLY_COMMAND = (
    'sleep "${FAULT_APPLY_SECONDS:-0}"; '
    f'echo "$SUBSTRATE_RELEASE $SUBSTRATE_COMPONENT" >> "$CELL_STATE_DIR/{APPLY_LOG}"'
)


def applier_env(apply_seconds: float = 0.0) -> dict[str, str]:
    return {
        "CELL_APPLIER": "command",
        "CELL_APPLY_COMMAND": APPLY_COMMAND,
        "FAULT_APPLY_SECONDS": str(apply_seconds),
    }


def applied(state_dir: Path) -> list[tuple[str, str]]:
    """(release, component) for each application the cell recorded, in order."""
    log = state_dir / APPLY_LOG
    if not log.exists():
        return []
    return [(line.split()[0], line.split()[1]) for line in log.read_text().splitlines() if line]


@dataclass
class Ledger:
    """Confirmed commands, keyed (cell, release, component), against what the cells applied."""

    confirmed: set[tuple[str, str, str]] = field(default_factory=set)
    applications: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    @classmethod
    def of(
        cls,
        cells: Iterable[tuple[str, Path]],
        release: str,
        components: Iterable[str] = ("server",),
    ) -> Ledger:
        """Each cell (id, state directory) was confirmed ``release``; read what each applied."""
        ledger = cls()
        for cell, state in cells:
            ledger.confirm(cell, release, components)
            ledger.read(cell, state)
        return ledger

    def confirm(self, cell: str, release: str, components: Iterable[str]) -> None:
        self.confirmed |= {(cell, release, c) for c in components}

    def read(self, cell: str, state_dir: Path) -> None:
        for release, component in applied(state_dir):
            self.applications[(cell, release, component)] += 1

    @property
    def lost(self) -> list[tuple[str, str, str]]:
        return sorted(k for k in self.confirmed if self.applications[k] == 0)

    @property
    def twice(self) -> list[tuple[str, str, str]]:
        return sorted(k for k, n in self.applications.items() if n > 1)

    @property
    def unasked(self) -> list[tuple[str, str, str]]:
        """Applied but never confirmed to anyone: a command made up along the way."""
        return sorted(k for k in self.applications if k not in self.confirmed)

    def summary(self) -> str:
        done = sum(1 for k in self.confirmed if self.applications[k] == 1)
        return (
            f"ledger: {len(self.confirmed)} confirmed, {done} applied once, "
            f"{len(self.lost)} lost, {len(self.twice)} applied twice, {len(self.unasked)} unasked"
        )

    def check(self) -> None:
        """Passes only with nothing lost, nothing applied twice and nothing made up."""
        print(self.summary())
        assert not self.lost, f"{self.summary()}; lost: {self.lost}"
        assert not self.twice, f"{self.summary()}; applied twice: {self.twice}"
        assert not self.unasked, f"{self.summary()}; applied without a command: {self.unasked}"
