"""The registry's metrics (the bus's own are in common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CELLS = Gauge("substrate_cells", "Cells by stage and status", ["stage", "status"])
HEARTBEAT_AGE_MAX = Gauge(
    "substrate_cell_heartbeat_age_max_seconds",
    "Age of the oldest last heartbeat among online cells, by the registry's clock",
)
HEARTBEATS = Counter(
    "substrate_heartbeats", "Heartbeats by outcome (applied, back_online, stale, ...)", ["outcome"]
)
_HEARTBEAT_OUTCOMES: dict[str, Counter] = {}


def heartbeat_outcome(outcome: str) -> None:
    """Count a heartbeat; the labelled child is looked up once (this runs per heartbeat)."""
    child = _HEARTBEAT_OUTCOMES.get(outcome)
    if child is None:
        child = _HEARTBEAT_OUTCOMES[outcome] = HEARTBEATS.labels(outcome)
    child.inc()


REGISTRATIONS = Counter("substrate_registrations", "Registrations by outcome", ["outcome"])
TRANSITIONS = Counter(
    "substrate_cell_liveness_transitions", "Cells marked offline or online", ["to"]
)
MAINTENANCE_DURATION = Histogram(
    "substrate_cell_maintenance_duration_seconds",
    "How long cells stayed in maintenance mode, per stay",
    buckets=(10, 30, 60, 120, 300, 600, 900, 1800, 3600),
)
MAINTENANCE_AGE_MAX = Gauge(
    "substrate_cell_maintenance_age_max_seconds",
    "How long the cell longest in maintenance right now has been in it",
)
ROTATIONS = Counter(
    "substrate_credential_rotations", "Credential rotations by outcome", ["outcome"]
)
# Every outcome from the start, at 0: an alert on one (grace_expired) then reads a series that
# exists before the first rotation goes wrong.
for _outcome in ("started", "confirmed", "by_hand", "grace_expired"):
    ROTATIONS.labels(_outcome)
FLAGS_BEHIND = Gauge(
    "substrate_cells_flags_behind",
    "Online cells whose last heartbeat showed an older flags snapshot than the current one",
)
