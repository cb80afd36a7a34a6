"""Named crash points, for the fault tests: with ``SUBSTRATE_CRASH_AT=<name>`` (or
``<name>:<detail>``, e.g. a message type) a process exits at once, with no cleanup, as under
kill -9, when it reaches that step. Unset, a crash point is one comparison.

The points sit where a crash is hardest to survive: after a handler's writes and before the
ack, after an outbox entry is taken and before it is published, and between an upgrade's phases.
"""

from __future__ import annotations

import os

# The exit code a crash point exits with, so a test tells it from any other death.
CRASH_EXIT = 70
_AT = os.environ.get("SUBSTRATE_CRASH_AT", "")


def crash_point(name: str, detail: str = "") -> None:
    if _AT in (name, f"{name}:{detail}") and _AT:
        os.write(2, f"crash point {name}:{detail} reached: exiting\n".encode())
        os._exit(CRASH_EXIT)
