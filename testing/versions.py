"""Release versions for tests that share a rollout service's Redis: each newer than every one
made before it in the session (a version older than the newest published is refused), and
unique, from the time in milliseconds."""

from __future__ import annotations

import time

# 2026-01-01T00:00:00Z: keeps the minor part short.
_EPOCH_MS = 1_767_225_600_000
_last = [0]


def fresh_minor() -> int:
    """A number larger than every one this process returned before."""
    _last[0] = max(_last[0] + 1, time.time_ns() // 1_000_000 - _EPOCH_MS)
    return _last[0]


def fresh_version(patch: int = 1) -> str:
    return f"3000.{fresh_minor()}.{patch}"
