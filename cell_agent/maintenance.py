"""The maintenance gate. Time-boxed: it holds an ``enabled_until`` deadline kept on disk, so
a dead agent cannot leave a cell in maintenance past it."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from pydantic import AwareDatetime, BaseModel

from cell_agent.journal import write_atomically
from common.clock import Clock
from common.metrics import Response

MESSAGE = (
    "We're in the middle of an update. We'll be back to normal soon. "
    "Please try again in a few minutes."
)
GATED_ACTIONS = ("start", "stop", "snapshot")


class MaintenanceState(BaseModel):
    enabled_until: AwareDatetime | None = None
    since: AwareDatetime | None = None
    reason: str = ""


class MaintenanceGate:
    def __init__(self, state_dir: Path, clock: Clock, window: timedelta) -> None:
        self.path = state_dir / "maintenance.json"
        self.clock = clock
        self.window = window
        self.state = (
            MaintenanceState.model_validate_json(self.path.read_text())
            if self.path.exists()
            else MaintenanceState()
        )

    def _save(self) -> None:
        write_atomically(self.path, self.state.model_dump_json())

    def is_on(self, now: datetime | None = None) -> bool:
        until = self.state.enabled_until
        return until is not None and (now or self.clock.now()) < until

    def enter(self, reason: str) -> datetime:
        now = self.clock.now()
        since = self.state.since if self.is_on(now) and self.state.since else now
        self.state = MaintenanceState(enabled_until=now + self.window, since=since, reason=reason)
        self._save()
        return now + self.window

    def renew(self) -> None:
        if self.is_on():
            self.enter(self.state.reason)

    def leave(self) -> None:
        self.state = MaintenanceState()
        self._save()

    async def route_maintenance(self, tail: str) -> Response:
        on = self.is_on()
        return Response.json(
            200,
            {
                "maintenance": on,
                "enabled_until": self.state.enabled_until.isoformat()
                if on and self.state.enabled_until
                else None,
                "reason": self.state.reason if on else "",
            },
        )

    async def route_gate(self, tail: str) -> Response:
        action = tail.strip("/")
        if action not in GATED_ACTIONS:
            return Response.json(404, {"error": f"unknown action {action!r}"})
        if self.is_on():
            return Response.json(503, {"allowed": False, "action": action, "message": MESSAGE})
        return Response.json(200, {"allowed": True, "action": action})
