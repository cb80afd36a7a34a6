"""``cell-agent defer``: the customer defers their cell's updates until a time, with a reason,
or cancels the deferral. The request goes out with the agent's other reports (kept in the
outbox, so it survives an outage); the control plane answers on the cell's command queue
(common/deferrals.py), and the answer is kept in CELL_STATE_DIR/deferral/answer.json.

Both sides keep an audit trail: the control plane in its audit log, the cell in
CELL_STATE_DIR/deferral/log.jsonl (each request with who asked, each answer)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cell_agent.journal import write_atomically
from cell_agent.pending import PendingDeferral, PendingReports
from common.deferrals import DeferralDecided
from common.messages import Delivery


class DeferralFile:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "deferral"
        self.answer_path = self.directory / "answer.json"
        self.log_path = self.directory / "log.jsonl"
        self._state_dir = state_dir

    def _log(self, entry: dict[str, object]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(entry, sort_keys=True, default=str) + "\n")

    def request(self, until: datetime | None, reason: str, by: str) -> str:
        """Keep the request for the running agent to send; its id."""
        request_id = uuid.uuid4().hex[:16]
        pending = PendingDeferral(
            request_id=request_id, until=until, reason=reason, cancel=until is None
        )
        PendingReports(self._state_dir).add(pending)
        self._log(
            {
                "at": datetime.now(UTC),
                "event": "cancel" if until is None else "request",
                "request_id": request_id,
                "until": until,
                "reason": reason,
                "by": by,
            }
        )
        return request_id

    def answer(self) -> dict[str, object] | None:
        if not self.answer_path.exists():
            return None
        answer: dict[str, object] = json.loads(self.answer_path.read_text())
        return answer

    async def on_decided(self, msg: DeferralDecided, delivery: Delivery) -> None:
        answer = {
            "request_id": msg.request_id,
            "accepted": msg.accepted,
            "until": msg.until.isoformat() if msg.until else None,
            "reason": msg.reason,
            "decided_at": msg.issued_at.isoformat(),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.answer_path, json.dumps(answer, indent=2))
        self._log({"at": datetime.now(UTC), "event": "answer", **answer})

    def wait(self, request_id: str, seconds: float) -> dict[str, object] | None:
        """The control plane's answer to ``request_id``, within ``seconds`` (None: not yet)."""
        deadline = time.monotonic() + seconds
        while True:
            answer = self.answer()
            if answer is not None and answer.get("request_id") == request_id:
                return answer
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)
