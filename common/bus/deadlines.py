"""Cheap timeouts for many short awaits."""

from __future__ import annotations

import asyncio
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

    def guard(self, seconds: float | None = None) -> _Guard:
        """Raise TimeoutError if the block takes longer than ``seconds`` (default: the
        period's); a longer one fires up to a quarter of the period late."""
        return _Guard(self, self.seconds if seconds is None else seconds)

    def _enter(self, seconds: float) -> tuple[int, asyncio.Task[Any]]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._next += 1
        token = self._next
        self._running[token] = (loop.time() + seconds, task)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch())
        return token, task

    def _exit(self, token: int, task: asyncio.Task[Any], cancelled: bool) -> bool:
        """Whether the block's cancellation was this guard's (a timeout)."""
        self._running.pop(token, None)
        if token in self._expired:
            self._expired.discard(token)
            if cancelled:
                task.uncancel()
                return True
        return False

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


class _Guard:
    """``Deadlines.guard``'s context: a class, not a generator (this wraps every publish,
    and a generator-based context manager cost a few microseconds more each time)."""

    __slots__ = ("_deadlines", "_seconds", "_task", "_token")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self._deadlines = deadlines
        self._seconds = seconds

    async def __aenter__(self) -> None:
        self._token, self._task = self._deadlines._enter(self._seconds)

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        cancelled = kind is not None and issubclass(kind, asyncio.CancelledError)
        if self._deadlines._exit(self._token, self._task, cancelled):
            raise TimeoutError from None
