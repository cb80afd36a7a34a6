"""A singleton lease in Redis with a fencing token (ARCHITECTURE: the few singleton loops).

Replicas of a service all run the loop; the one holding the lease does the work. The lease's
value is ``<owner>:<token>``, the token coming from a counter that only grows, so a holder that
stalled past its TTL (a GC pause, a frozen VM) and another that took over never hold the same
value. Every write the holder makes is a Change guarded on the lease still holding its value
(:meth:`Lease.fenced`): a stale holder's write is refused by Redis itself, not by the holder's
belief that it still leads.
"""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from common.scripts import Change, Changes, script


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, ttl_seconds: float) -> None:
        self.key = key
        self.owner = uuid.uuid4().hex[:12]
        self.ttl_ms = int(ttl_seconds * 1000)
        self.value: str | None = None
        self._hold = script(redis, "lease_hold")
        self._changes = Changes(redis)

    def fenced(self, change: Change, fence: str) -> Change:
        """``change``, to be written only while ``fence`` is still this lease's value."""
        return change.expecting_value(self.key, fence)

    async def hold(self) -> str | None:
        """Take or renew the lease; the fence value to pass to writes, or None if another
        holder has it. Call it more often than the TTL."""
        value = await self._hold(
            keys=[self.key, self.key + ":token"], args=[self.value or "", self.owner, self.ttl_ms]
        )
        self.value = str(value) if value else None
        return self.value

    async def release(self) -> None:
        """Give the lease up (on a clean stop) so another replica need not wait for the TTL."""
        if self.value is not None:
            await self._changes.apply(self.fenced(Change().run("DEL", self.key), self.value))
            self.value = None
