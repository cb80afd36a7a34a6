"""The agent's outbox of reports: kept in the order made, of every kind, readable across
versions, and never blocked by one unreadable file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from cell_agent.pending import (
    Pending,
    PendingDebugAccess,
    PendingMaintenance,
    PendingReports,
    PendingUpgrade,
)

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def test_reports_of_every_kind_come_back_in_the_order_they_were_made(tmp_path: Path) -> None:
    outbox = PendingReports(tmp_path)
    made: list[Pending] = [
        PendingUpgrade(generation=3, release_version="1.0.0", phase="applying"),
        PendingMaintenance(enabled=True, enabled_until=NOW, reason="updating"),
        PendingDebugAccess(action="granted", role_arn="arn:aws:iam::1:role/d", occurred_at=NOW),
        PendingMaintenance(enabled=False, reason="update finished"),
        PendingUpgrade(generation=3, release_version="1.0.0", phase="succeeded"),
    ]
    for report in made:
        outbox.add(report)
    assert [r for _, r in PendingReports(tmp_path).waiting()] == made
    first, _ = outbox.waiting()[0]
    outbox.sent(first)
    assert [r for _, r in outbox.waiting()] == made[1:]


def test_a_report_kept_before_reports_had_kinds_is_debug_access(tmp_path: Path) -> None:
    outbox = PendingReports(tmp_path)
    old = {"action": "revoked", "role_arn": "arn:aws:iam::1:role/d", "occurred_at": NOW.isoformat()}
    (outbox.directory / "00000000000000000001-aaaaaaaa.json").write_text(json.dumps(old))
    ((_, report),) = outbox.waiting()
    assert isinstance(report, PendingDebugAccess) and report.action == "revoked"


def test_an_unreadable_report_is_moved_aside_and_does_not_block_the_rest(tmp_path: Path) -> None:
    outbox = PendingReports(tmp_path)
    (outbox.directory / "00000000000000000001-aaaaaaaa.json").write_text("{not json")
    outbox.add(PendingMaintenance(enabled=False))
    waiting = outbox.waiting()
    assert [type(r) for _, r in waiting] == [PendingMaintenance]
    assert (outbox.directory / "00000000000000000001-aaaaaaaa.unreadable").exists()
