"""Named crash and pause points, for the fault tests: with ``SUBSTRATE_CRASH_AT=<name>`` (or
``<name>:<detail>``, e.g. a message type) a process exits at once, with no cleanup, as under
kill -9, when it reaches that step. Unset, a crash point costs a call and one test.

The points sit where a crash is hardest to survive: after a handler's writes and before the
ack, after an outbox entry is taken and before it is published, and between an upgrade's phases.
"""

from __future__ import annotations

import os
import signal

# With SUBSTRATE_FAULT_DUPLICATES=1 a process publishes every message twice, the second copy
# identical to the first (message id included), as a publisher retrying after a lost confirm
# would: what RELIABILITY's fault 5 delivers to every consumer.
DUPLICATES = os.environ.get("SUBSTRATE_FAULT_DUPLICATES", "") == "1"

# The exit code a crash point exits with, so a test tells it from any other death.
CRASH_EXIT = 70
_AT = os.environ.get("SUBSTRATE_CRASH_AT", "")
# ``SUBSTRATE_PAUSE_AT=<name>[:<detail>]``: the process stops itself (SIGSTOP) the first time it
# reaches that step, as a process frozen by a GC pause or a suspended VM would, until the test
# sends SIGCONT: what a stale singleton leader looks like.
_PAUSE_AT = os.environ.get("SUBSTRATE_PAUSE_AT", "")
_paused: set[str] = set()


def _reached(setting: str, name: str, detail: str) -> bool:
    return bool(setting) and setting in (name, f"{name}:{detail}")


def crash_point(name: str, detail: str = "") -> None:
    if _reached(_AT, name, detail):
        os.write(2, f"crash point {name}:{detail} reached: exiting\n".encode())
        os._exit(CRASH_EXIT)


def pause_point(name: str, detail: str = "") -> None:
    if _reached(_PAUSE_AT, name, detail) and not _paused:
        _paused.add(_PAUSE_AT)
        os.write(2, f"pause point {name}:{detail} reached: stopping\n".encode())
        os.kill(os.getpid(), signal.SIGSTOP)
