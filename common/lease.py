"""A singleton lease in Redis with a fencing token (ARCHITECTURE: the few singleton loops).

Replicas of a service all run the loop; the one holding the lease does the work. The lease's
value is ``<owner>:<token>``, the token coming from a counter that only grows, so a holder that
stalled past its TTL (a GC pause, a frozen VM) and another that took over never hold the same
value. Every write the holder makes goes through a Lua script that first checks the lease
still holds its value (:data:`FENCE_CHECK`): a stale holder's write is refused by Redis itself,
not by the holder's belief that it still leads.
"""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

# For scripts that write on the lease's behalf: KEYS[1] is the lease, ARGV[1] the fence value.
FENCE_CHECK = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\n"

# KEYS: lease, token counter; ARGV: current value ('' if none), owner, ttl ms.
_HOLD = """
local current = redis.call('GET', KEYS[1])
if current and current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return current
end
if current then return false end
local value = ARGV[2] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
"""

# KEYS: lease; ARGV: value.
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, ttl_seconds: float) -> None:
        self.key = key
        self.owner = uuid.uuid4().hex[:12]
        self.ttl_ms = int(ttl_seconds * 1000)
        self.value: str | None = None
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)

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
            await self._release(keys=[self.key], args=[self.value])
            self.value = None
