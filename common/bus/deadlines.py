"""Cheap timeouts for many short awaits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class Deadlines:
    """Timeouts for many short awaits at the cost of a dict entry each.

    ``asyncio.timeout`` schedules and cancels a timer per call, a large share of a confirmed
    publish's CPU time (bench/RESULTS.md). Here one watchdog task wakes a few times per
    timeout period and cancels the awaits past their deadline; ``guard`` turns that
    cancellation into TimeoutError. A timeout fires between ``seconds`` and 1.25 x ``seconds``.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[int, tuple[float, asyncio.Task[Any]]] = {}
        self._expired: set[int] = set()
        self._next = 0
        self._watchdog: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def guard(self, seconds: float | None = None) -> AsyncIterator[None]:
        """Raise TimeoutError if the block takes longer than ``seconds`` (default: the
        period's); a longer one fires up to a quarter of the period late."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._next += 1
        token = self._next
        self._running[token] = (loop.time() + (self.seconds if seconds is None else seconds), task)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch())
        try:
            yield
        except asyncio.CancelledError:
            if token in self._expired:
                task.uncancel()
                raise TimeoutError from None
            raise
        finally:
            self._running.pop(token, None)
            self._expired.discard(token)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            await asyncio.sleep(max(self.seconds / 4, 0.01))
            now = loop.time()
            for token, (deadline, task) in list(self._running.items()):
                if deadline <= now and token not in self._expired:
                    self._expired.add(token)
                    task.cancel()

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
