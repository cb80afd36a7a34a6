"""The rollout service's Redis keys.

rollout:release:<version>   string: the published release (JSON, with who and when)
rollout:releases            set: every published version
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
