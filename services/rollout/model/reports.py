"""The order of a cell's upgrade reports.

Redelivery can reorder a cell's reports. They are kept in one order: by generation, then by
phase within a generation (the steps in the order an agent takes them, every outcome last), so
a report is recorded only if it is newer than the one recorded. A step that arrives after its
generation's outcome, or a report of an older generation, changes nothing; a duplicate neither.
"""

from __future__ import annotations

from common.vocabulary import TERMINAL_PHASES, UPGRADE_PHASES, UpgradePhase

# Room for every phase within one generation.
_PHASES_PER_GENERATION = len(UPGRADE_PHASES)
_OUTCOME_RANK = _PHASES_PER_GENERATION - 1
_STEP_RANK = {
    phase: i for i, phase in enumerate(p for p in UPGRADE_PHASES if p not in TERMINAL_PHASES)
}


def report_order(generation: int, phase: UpgradePhase) -> int:
    """A number that grows with every report a cell makes, in the order it makes them."""
    rank = _OUTCOME_RANK if phase in TERMINAL_PHASES else _STEP_RANK[phase]
    return generation * _PHASES_PER_GENERATION + rank
