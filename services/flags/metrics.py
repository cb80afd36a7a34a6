"""The flags service's metrics (the bus's own are in common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

EVALUATIONS = Counter(
    "substrate_flag_evaluations", "Central evaluations by flag and reason", ["flag", "reason"]
)
SNAPSHOT_VERSION = Gauge("substrate_flags_snapshot_version", "The current flags snapshot version")
PUSHED = Counter(
    "substrate_flags_snapshots_sent",
    "Snapshots sent to cells, by why and outcome",
    ["why", "outcome"],
)
_CHILDREN: dict[tuple[str, str], Counter] = {}


def evaluated(flag: str, reason: str) -> None:
    child = _CHILDREN.get((flag, reason))
    if child is None:
        child = _CHILDREN[(flag, reason)] = EVALUATIONS.labels(flag, reason)
    child.inc()
