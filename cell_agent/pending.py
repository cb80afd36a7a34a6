"""Reports waiting to be sent, kept in CELL_STATE_DIR/outbox until the broker confirms them:
every report the agent makes (upgrade phases, entering and leaving maintenance) and those the
customer's commands make (``cell-agent debug-access`` and ``defer``, which run beside the
agent and may run while the control plane is away). The running agent sends them in the order
they were made, each once it is confirmed, and numbers them then (the per-cell sequence
belongs to the agent), so none is forgotten across an outage or a restart."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter, ValidationError

from cell_agent.journal import write_atomically
from common.health import Verdict
from common.vocabulary import DebugAccessAction, UpgradePhase

log = logging.getLogger(__name__)


class PendingUpgrade(BaseModel):
    kind: Literal["upgrade"] = "upgrade"
    generation: int
    release_version: str | None
    phase: UpgradePhase
    error: str | None = None
    verdict: Verdict | None = None
    check: str | None = None
    # What the cell runs once this report is made.
    installed_release: str | None = None


class PendingMaintenance(BaseModel):
    kind: Literal["maintenance"] = "maintenance"
    enabled: bool
    enabled_until: AwareDatetime | None = None
    reason: str = ""


class PendingDebugAccess(BaseModel):
    kind: Literal["debug-access"] = "debug-access"
    action: DebugAccessAction
    role_arn: str
    occurred_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    reason: str = ""
    granted_by: str = ""


class PendingDeferral(BaseModel):
    """``cell-agent defer``: sent as a sync with reason "defer" (cell_agent/deferral.py)."""

    kind: Literal["defer"] = "defer"
    request_id: str
    until: AwareDatetime | None = None
    reason: str = ""
    cancel: bool = False


Pending = Annotated[
    PendingUpgrade | PendingMaintenance | PendingDebugAccess | PendingDeferral,
    Field(discriminator="kind"),
]
_PENDING: TypeAdapter[Pending] = TypeAdapter(Pending)


class PendingReports:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "outbox"
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, report: Pending) -> Path:
        # Nanoseconds first: names sort in the order the reports were made.
        path = self.directory / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        write_atomically(path, report.model_dump_json())
        return path

    def waiting(self) -> list[tuple[Path, Pending]]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                # Kept by an agent from before reports had kinds: those were all debug access.
                data.setdefault("kind", "debug-access")
                found.append((path, _PENDING.validate_python(data)))
            except (ValueError, ValidationError) as exc:
                # Never block the reports behind it: put it aside for the operator to read.
                log.error("unreadable pending report %s (%s); moved aside", path.name, exc)
                path.rename(path.with_suffix(".unreadable"))
        return found

    def sent(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def deferral_fields(report: PendingDeferral) -> dict[str, object]:
    """A kept deferral as the sync report's fields."""
    return {
        "defer_id": report.request_id,
        "defer_until": report.until,
        "defer_reason": report.reason,
        "defer_cancel": report.cancel,
    }
