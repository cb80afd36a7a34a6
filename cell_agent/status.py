"""``cell-agent state``: what the agent keeps in CELL_STATE_DIR, read from there alone (no
broker URL, no control plane): its identity without secrets, the installed release, the last
upgrade's outcome and health verdict, the flags snapshot it holds, and whether the running
agent was connected when it last said so (``link.json``, written at each heartbeat)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cell_agent.deferral import DeferralFile
from cell_agent.flags import LocalFlags
from cell_agent.journal import Journal, write_atomically
from cell_agent.state import StateStore, dump

LINK = "link.json"


def write_link(state_dir: Path, *, connected: bool, at: datetime) -> None:
    write_atomically(state_dir / LINK, json.dumps({"connected": connected, "at": at.isoformat()}))


def describe(state_dir: Path, now: datetime | None = None) -> dict[str, Any]:
    journal = Journal(state_dir)
    applied, progress = journal.applied, journal.progress
    out: dict[str, Any] = json.loads(dump(StateStore(state_dir).state))
    out["installed_release"] = applied.release.version if applied.release else None
    out["last_upgrade"] = (
        None
        if progress is None
        else {
            "generation": progress.generation,
            "outcome": progress.phase,
            "verdict": progress.verdict,
            "check": progress.check,
            "reason": progress.error,
            "health": progress.health,
            "reported": progress.reported,
        }
    )
    # Read as the agent reads it (a damaged file counts as none, as it does for the agent).
    out["flags_snapshot_version"] = LocalFlags(state_dir, dict).version or None
    out["deferral"] = DeferralFile(state_dir).answer()
    link = state_dir / LINK
    if link.exists():
        said = json.loads(link.read_text())
        age = ((now or datetime.now(UTC)) - datetime.fromisoformat(said["at"])).total_seconds()
        out["connected"] = said["connected"]
        out["connected_as_of"] = said["at"]
        out["connected_seconds_ago"] = round(age, 1)
    else:
        out["connected"] = None  # no agent has run with this state directory
    return out
