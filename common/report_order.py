"""The order of a cell's upgrade reports.

Redelivery can reorder a cell's reports. They are kept in one order: by generation, then by
phase within a generation (the steps in the order an agent takes them, then the outcome, then
the health verdict that follows a success: a verdict of the bake, then an unhealthy one of the
watch after it, which also comes as the ``rolled_back`` it caused), so a report is recorded only
if it is newer than the one recorded. A step that arrives after its generation's outcome, or a
report of an older generation, changes nothing; a duplicate neither.
"""

from __future__ import annotations

from common.health import Verdict
from common.vocabulary import TERMINAL_PHASES, UPGRADE_PHASES, UpgradePhase

_STEP_RANK = {
    phase: i for i, phase in enumerate(p for p in UPGRADE_PHASES if p not in TERMINAL_PHASES)
}
_OUTCOME_RANK = len(_STEP_RANK)
_VERDICT_RANK = {"healthy": _OUTCOME_RANK + 1, "inconclusive": _OUTCOME_RANK + 1}
_UNHEALTHY_RANK = _OUTCOME_RANK + 2
# Room for every report within one generation (a power of two: the product stays exact).
_PER_GENERATION = 8
assert _UNHEALTHY_RANK < _PER_GENERATION


def report_order(generation: int, phase: UpgradePhase, verdict: Verdict | None = None) -> int:
    """A number that grows with every report a cell makes, in the order it makes them."""
    if verdict == "unhealthy":
        rank = _UNHEALTHY_RANK
    elif verdict is not None:
        rank = _VERDICT_RANK[verdict]
    else:
        rank = _OUTCOME_RANK if phase in TERMINAL_PHASES else _STEP_RANK[phase]
    return generation * _PER_GENERATION + rank
