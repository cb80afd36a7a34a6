"""The shared watchdog behind every publish's confirm timeout: its own period by default, or
the one a guard asks for (the flags broadcast waits longer than a single publish)."""

from __future__ import annotations

import asyncio

import pytest

from common.bus.deadlines import Deadlines


async def test_a_guard_past_the_period_raises_timeout_and_one_within_it_does_not() -> None:
    deadlines = Deadlines(0.1)
    try:
        with pytest.raises(TimeoutError):
            async with deadlines.guard():
                await asyncio.Event().wait()
        async with deadlines.guard():
            await asyncio.sleep(0)
    finally:
        deadlines.stop()


async def test_a_guard_given_longer_outlives_the_period_and_still_times_out() -> None:
    deadlines = Deadlines(0.1)
    done = asyncio.Event()
    try:

        async def release() -> None:
            # Well past the period (and its quarter of lateness): the default would have fired.
            await asyncio.sleep(0.5)
            done.set()

        releaser = asyncio.create_task(release())
        async with deadlines.guard(5.0):
            await done.wait()
        await releaser
        with pytest.raises(TimeoutError):
            async with deadlines.guard(0.3):
                await asyncio.Event().wait()
    finally:
        deadlines.stop()
