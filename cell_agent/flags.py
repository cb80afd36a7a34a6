"""The agent's flags: the newest snapshot the control plane sent, kept in CELL_STATE_DIR so it
survives restarts and answers while the control plane is unreachable, and evaluated locally
with the same engine as the flags service (common.flags)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cell_agent.journal import write_atomically
from common.flags import EMPTY, Evaluation, Snapshot
from common.messages import Delivery, FlagsBroadcast, FlagsSnapshot

log = logging.getLogger(__name__)

# Attributes the cell knows better than the control plane's copy.
Own = Callable[[], dict[str, Any]]


class LocalFlags:
    def __init__(self, state_dir: Path, own: Own) -> None:
        self.path = state_dir / "flags" / "snapshot.json"
        self.own = own
        self.snapshot = EMPTY
        self.cell: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            stored = json.loads(self.path.read_text())
            self.snapshot = Snapshot.from_wire(stored["version"], stored["flags"])
            self.cell = dict(stored.get("cell") or {})
        except (OSError, ValueError, KeyError, ValidationError) as exc:
            # A damaged file: answer defaults until the next snapshot arrives (sync asks).
            log.error("flags snapshot %s unreadable (%s); waiting for a new one", self.path, exc)

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def has_attributes(self) -> bool:
        """A snapshot addressed to this cell was kept: the broadcast ones can be applied."""
        return self.path.exists()

    def apply(self, msg: FlagsSnapshot | FlagsBroadcast) -> bool:
        """Keep a snapshot newer than the one held: on disk first, then in memory. A broadcast
        keeps the cell's attributes from the last snapshot addressed to it."""
        if msg.version <= self.snapshot.version and self.path.exists():
            return False
        cell = dict(msg.cell) if isinstance(msg, FlagsSnapshot) else self.cell
        snapshot = Snapshot.from_wire(msg.version, msg.flags)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.path,
            json.dumps({"version": msg.version, "flags": list(msg.flags), "cell": cell}),
        )
        self.snapshot, self.cell = snapshot, cell
        log.info("flags snapshot %d: %d flags", msg.version, len(snapshot.flags))
        return True

    async def on_snapshot(self, msg: FlagsSnapshot, delivery: Delivery) -> None:
        self.apply(msg)

    def attributes(self) -> dict[str, Any]:
        return {**self.cell, **self.own()}

    def evaluate(self, key: str, default: Any = None) -> Evaluation:
        return self.snapshot.evaluate(key, self.attributes(), default)
