"""Time as a dependency: services take a Clock so tests can move time instead of sleeping."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

# A file holding a number of seconds this process's wall clock is off by. The fault tests use it
# to make clocks disagree and to make days pass while a cell is away, in whole processes; it is
# read at most every READ_SKEW_EVERY seconds. Unset, the clock is the system's.
SKEW_FILE_ENV = "SUBSTRATE_CLOCK_SKEW_FILE"
READ_SKEW_EVERY = 0.2


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def __init__(self, skew_file: str | None = None) -> None:
        path = skew_file if skew_file is not None else os.environ.get(SKEW_FILE_ENV, "")
        self._skew_file = Path(path) if path else None
        self._skew = 0.0
        self._read_at = float("-inf")

    def now(self) -> datetime:
        if self._skew_file is None:
            return datetime.now(UTC)
        return datetime.now(UTC) + timedelta(seconds=self.skew())

    def skew(self) -> float:
        """Seconds the skew file says this clock is off by (0 without one, or while it is
        missing or unreadable)."""
        if self._skew_file is None:
            return 0.0
        if time.monotonic() - self._read_at >= READ_SKEW_EVERY:
            self._read_at = time.monotonic()
            try:
                self._skew = float(self._skew_file.read_text().strip() or 0)
            except (OSError, ValueError):
                self._skew = 0.0
        return self._skew

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("FakeClock.set needs an aware datetime")
        self._mono += (when - self._now).total_seconds()
        self._now = when
