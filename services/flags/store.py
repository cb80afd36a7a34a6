"""The flags service's Redis keys.

flags:flag:<key>      string: the flag (common.flags.Flag as JSON)
flags:keys            set: every flag key
flags:version         string: the snapshot version, bumped by every change to any flag
flags:history:<key>   list: the flag's audit log, newest first (who, when, what changed)
flags:fleet           hash: what flags knows of each cell from events (common.fleet): one
                      HGETALL reads the whole fleet for a preview
flags:outbox          list: events not yet published (common.outbox)
flags:pending:<key>   string: a change of the flag kept to be made later (PendingChange)
flags:pending         set: the keys with a pending change
flags:due             sorted set: key -> when its pending change is made (approved or not
                      needing approval, and timed)

A change writes the flag, the version, the audit entry and the ``flags.changed`` event as one
Change, only if the flag and the version are still what the caller read (so two operators'
changes cannot interleave, and every version is given once).
"""

from __future__ import annotations

import json
from datetime import datetime

import redis.asyncio as aioredis

from common.flags import Flag, Snapshot
from common.fleet import FleetView
from common.messages import FlagsChanged
from common.outbox import Outbox, outbox_entry
from common.requests.flags import HistoryEntry, PendingChange
from common.scripts import Change, Changes

PREFIX = "flags:"
FLAG = PREFIX + "flag:"
KEYS = PREFIX + "keys"
VERSION = PREFIX + "version"
HISTORY = PREFIX + "history:"
OUTBOX = PREFIX + "outbox"
PENDING = PREFIX + "pending:"
PENDING_KEYS = PREFIX + "pending"
DUE = PREFIX + "due"
HISTORY_KEPT = 200


class Conflict(Exception):
    """The flag (or another flag) changed since it was read."""


def diff(old: dict[str, object] | None, new: dict[str, object] | None) -> dict[str, object]:
    """Top-level fields that changed: ``{field: {"from": ..., "to": ...}}``."""
    old, new = old or {}, new or {}
    return {
        k: {"from": old.get(k), "to": new.get(k)}
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    }


class FlagsStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.fleet = FleetView(redis, PREFIX, with_targets=True)
        self.outbox = Outbox(redis, OUTBOX)
        self._changes = Changes(redis)
        self._snapshot: Snapshot | None = None

    # -- flags -----------------------------------------------------------------------------------

    async def raw(self, key: str) -> str | None:
        value = await self.redis.get(FLAG + key)
        return str(value) if value is not None else None

    async def get(self, key: str) -> Flag | None:
        raw = await self.raw(key)
        return Flag.model_validate_json(raw) if raw else None

    async def version(self) -> int:
        return int(await self.redis.get(VERSION) or 0)

    async def snapshot(self) -> Snapshot:
        """Every flag, compiled; rebuilt only when the version moved."""
        version = await self.version()
        if self._snapshot is not None and self._snapshot.version == version:
            return self._snapshot
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(VERSION)
        pipe.smembers(KEYS)
        version_raw, keys = await pipe.execute()
        keys = sorted(str(k) for k in keys)
        raws = await self.redis.mget([FLAG + k for k in keys]) if keys else []
        flags = {k: Flag.model_validate_json(r) for k, r in zip(keys, raws, strict=True) if r}
        self._snapshot = Snapshot(int(version_raw or 0), flags)
        return self._snapshot

    async def change(
        self,
        key: str,
        *,
        expected: str | None,
        new: Flag | None,
        actor: str,
        at: datetime,
        pending: str | None = None,
    ) -> int:
        """Write (or, with ``new`` None, delete) a flag read as ``expected``; the new version.
        Conflict if the flag or the version moved since. ``pending``: the pending change (as
        read) this makes, removed in the same write, and Conflict if it is gone: two replicas
        (or a restarted one) make a timed change once."""
        current = await self.version()
        version = current + 1
        old_json = json.loads(expected) if expected else None
        new_json = new.model_dump(mode="json") if new else None
        action = "deleted" if new is None else ("created" if expected is None else "updated")
        entry = {
            "at": at.isoformat(),
            "actor": actor,
            "action": action,
            "diff": diff(old_json, new_json),
            "version": version,
        }
        event = FlagsChanged(
            at=at, key=key, snapshot_version=version, actor=actor, deleted=new is None
        )
        change = (
            Change()
            .expecting_value(FLAG + key, expected)
            .expecting_value(VERSION, current or None)
            .run("SET", VERSION, version)
            .push_newest(HISTORY + key, json.dumps(entry), HISTORY_KEPT)
            .push(OUTBOX, outbox_entry(event))
        )
        if pending is not None:
            change.expecting_value(PENDING + key, pending).run("DEL", PENDING + key)
            change.run("SREM", PENDING_KEYS, key).run("ZREM", DUE, key)
        if new is None:
            change.run("DEL", FLAG + key).run("SREM", KEYS, key)
        else:
            change.run("SET", FLAG + key, new.model_dump_json()).run("SADD", KEYS, key)
        if not (await self._changes.apply(change)).written:
            raise Conflict(key)
        return version

    async def history(self, key: str) -> list[HistoryEntry]:
        entries = await self.redis.lrange(HISTORY + key, 0, -1)
        return [HistoryEntry.model_validate_json(e) for e in entries]

    # -- changes kept for later ------------------------------------------------------------------

    async def pending_raw(self, key: str) -> str | None:
        value = await self.redis.get(PENDING + key)
        return str(value) if value is not None else None

    async def pending(self) -> list[PendingChange]:
        keys = sorted(str(k) for k in await self.redis.smembers(PENDING_KEYS))
        raws = await self.redis.mget([PENDING + k for k in keys]) if keys else []
        return [PendingChange.model_validate_json(r) for r in raws if r]

    async def keep(self, change: PendingChange, *, expected: str | None) -> bool:
        """Store a pending change if the one stored is still ``expected`` (None: none); timed
        and approved (or needing no approval), it is also due at its time."""
        write = (
            Change()
            .expecting_value(PENDING + change.key, expected)
            .run("SET", PENDING + change.key, change.model_dump_json())
            .run("SADD", PENDING_KEYS, change.key)
        )
        if change.at is not None and change.approval != "needed":
            write.run("ZADD", DUE, change.at.timestamp(), change.key)
        return (await self._changes.apply(write)).written

    async def drop(self, key: str, *, expected: str) -> bool:
        write = (
            Change()
            .expecting_value(PENDING + key, expected)
            .run("DEL", PENDING + key)
            .run("SREM", PENDING_KEYS, key)
            .run("ZREM", DUE, key)
        )
        return (await self._changes.apply(write)).written

    async def due(self, now: datetime, limit: int = 100) -> list[str]:
        keys = await self.redis.zrangebyscore(DUE, "-inf", now.timestamp(), start=0, num=limit)
        return [str(k) for k in keys]
