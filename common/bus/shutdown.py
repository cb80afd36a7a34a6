"""Stopping: what a bus told to stop does with the work it holds.

On SIGTERM a service cancels its consumers, then waits here for the handlers in flight to
finish and for their acks to go out. A delivery that arrives after the stop began, or one held
for its retry pause, goes back to its queue at once, for another replica or the next start;
prefetched deliveries that never started go back when the channel closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress

log = logging.getLogger(__name__)


class Stopping:
    """Whether the bus is stopping, and how many handlers are still running."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def handling(self) -> None:
        """A handler starts."""
        self._inflight += 1
        self._idle.clear()

    def handled(self) -> None:
        """A handler ended, however it ended."""
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less once the bus stops (a delivery held for a pause then goes
        back to the queue for another replica at once)."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()

    async def drain(self, timeout: float, send_acks: Callable[[], Awaitable[None]]) -> bool:
        """Wait for the running handlers, then send their acks. False if handlers were still
        running after ``timeout`` seconds; acks that cannot be sent are redelivered."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
                await send_acks()
        except TimeoutError:
            log.error("%d handlers still running after %.0fs", self._inflight, timeout)
            return False
        except Exception as exc:
            log.warning("could not send the last acks: %r (they will be redelivered)", exc)
        return True
