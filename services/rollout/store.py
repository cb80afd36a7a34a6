"""The rollout service's Redis keys.

rollout:release:<version>   string: the published release (JSON, with who and when)
rollout:releases            set: every published version
rollout:cell:<id>           hash: what rollout knows of a cell (from events and reports)
rollout:cells               set: every cell id it has heard of
rollout:outbox              list: events not yet published (common.outbox)
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from common.messages import Event, Release
from common.outbox import Outbox, outbox_entry

PREFIX = "rollout:"
RELEASE = PREFIX + "release:"
RELEASES = PREFIX + "releases"
OUTBOX = PREFIX + "outbox"
CELL = PREFIX + "cell:"
CELLS = PREFIX + "cells"

# KEYS: cell, cells; ARGV: id, at (epoch), then field, value pairs.
# Events can arrive twice or out of order: a fact older than the one recorded is dropped, and
# a decommissioned cell stays decommissioned.
_CELL_FACT = """
local rec = redis.call('HMGET', KEYS[1], 'fact_at', 'status')
if rec[2] == 'decommissioned' then return 0 end
if rec[1] and tonumber(ARGV[2]) < tonumber(rec[1]) then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'fact_at', ARGV[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: release, releases, outbox; ARGV: version, record, event entry.
# A version is published once: the record, the index and the event are written together.
_PUBLISH = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX') == false then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""


class RolloutStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.outbox = Outbox(redis, OUTBOX)
        self._publish = redis.register_script(_PUBLISH)
        self._cell_fact = redis.register_script(_CELL_FACT)

    async def cell_fact(self, cell_id: str, at: datetime, **fields: str) -> bool:
        """Record facts about a cell as of ``at`` (ignored if older than what is recorded)."""
        pairs = [item for kv in fields.items() for item in kv]
        applied = await self._cell_fact(
            keys=[CELL + cell_id, CELLS], args=[cell_id, at.timestamp(), *pairs]
        )
        return bool(applied)

    async def set_installed(self, cell_id: str, version: str | None) -> None:
        """The release a cell reports installed; not ordered with lifecycle facts."""
        if await self.redis.exists(CELL + cell_id):
            await self.redis.hset(CELL + cell_id, "installed_release", version or "")

    async def cells(self) -> list[dict[str, str]]:
        ids = sorted(str(i) for i in await self.redis.smembers(CELLS))
        pipe = self.redis.pipeline(transaction=False)
        for cell_id in ids:
            pipe.hgetall(CELL + cell_id)
        return [r for r in await pipe.execute() if r and r.get("stage")]

    async def publish(self, release: Release, *, at: datetime, by: str, event: Event) -> bool:
        record = {
            "release": release.model_dump(mode="json"),
            "published_at": at.isoformat(),
            "published_by": by,
        }
        created = await self._publish(
            keys=[RELEASE + release.version, RELEASES, OUTBOX],
            args=[release.version, json.dumps(record), outbox_entry(event)],
        )
        return bool(created)

    async def get(self, version: str) -> dict[str, Any] | None:
        raw = await self.redis.get(RELEASE + version)
        return json.loads(raw) if raw else None

    async def versions(self) -> list[str]:
        return [str(v) for v in await self.redis.smembers(RELEASES)]
