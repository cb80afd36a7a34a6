"""Reports waiting to be sent, kept in CELL_STATE_DIR/outbox: made by the customer's commands
(``cell-agent debug-access``), which run beside the agent and may run while the control plane
is away. The running agent sends them in the order they were made, each once it is confirmed,
and numbers them then (the per-cell sequence belongs to the agent)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from pydantic import AwareDatetime, BaseModel

from cell_agent.journal import write_atomically
from common.vocabulary import DebugAccessAction


class PendingDebugAccess(BaseModel):
    action: DebugAccessAction
    role_arn: str
    occurred_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    reason: str = ""
    granted_by: str = ""


class PendingReports:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "outbox"
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, report: PendingDebugAccess) -> Path:
        # Nanoseconds first: names sort in the order the reports were made.
        path = self.directory / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        write_atomically(path, report.model_dump_json())
        return path

    def waiting(self) -> list[tuple[Path, PendingDebugAccess]]:
        return [(p, PendingDebugAccess.model_validate_json(p.read_text()))
                for p in sorted(self.directory.glob("*.json"))]  # fmt: skip

    def sent(self, path: Path) -> None:
        path.unlink(missing_ok=True)
