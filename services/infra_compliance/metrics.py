"""The infra_compliance service's metrics (the bus's own are in common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CELLS = Gauge("substrate_infra_cells", "Cells by infrastructure compliance state", ["state"])
NEAREST_DEADLINE = Gauge(
    "substrate_infra_nearest_deadline_seconds",
    "Seconds until the earliest deadline of a cell still pending (0: none pending)",
)
REMINDERS = Counter("substrate_infra_reminders", "Reminders sent to customers")
BREACHES = Counter("substrate_infra_breaches", "Cells that passed their deadline out of SLA")
NOTICES = Counter(
    "substrate_infra_notices", "SNS messages to organisations' topics, by outcome", ["outcome"]
)
UNPUBLISHED = Counter(
    "substrate_infra_unpublished_versions",
    "Cells found reporting a template version never published (counted as none), per change",
)
