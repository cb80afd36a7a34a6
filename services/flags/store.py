"""The flags service's Redis keys.

flags:flag:<key>      string: the flag (common.flags.Flag as JSON)
flags:keys            set: every flag key
flags:version         counter: the snapshot version, bumped by every change to any flag
flags:history:<key>   list: the flag's audit log, newest first (who, when, what changed)
flags:cells           hash: cell id -> its attributes, tab-separated (see CELL_FIELDS): one
                      HGETALL reads the whole fleet for a preview
flags:outbox          list: events not yet published (common.outbox)

A change writes the flag, the version, the audit entry and the ``flags.changed`` event in one
Lua script, and only if the flag is still what the caller read (so two operators' changes
cannot interleave).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from common.flags import Flag, Snapshot
from common.messages import FlagsChanged
from common.outbox import Outbox, outbox_entry

PREFIX = "flags:"
FLAG = PREFIX + "flag:"
KEYS = PREFIX + "keys"
VERSION = PREFIX + "version"
HISTORY = PREFIX + "history:"
CELLS = PREFIX + "cells"
OUTBOX = PREFIX + "outbox"
HISTORY_KEPT = 200
# Stands for the snapshot version in texts built before the script knows it.
SENTINEL = -770_017_077

# A cell's attributes in flags:cells, in this order, then the time of the newest fact.
CELL_FIELDS = ("stage", "region", "org", "installed_release", "agent_version", "status")

# KEYS: flag, keys, version, history, outbox; ARGV: key, expected ('' if absent), new ('' to
# delete), then a function of the version: the audit entry and the event, with %d for it.
_CHANGE = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[2] then return -1 end
local version = redis.call('INCR', KEYS[3])
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[1])
end
redis.call('LPUSH', KEYS[4], string.format(ARGV[4], version))
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[6]) - 1)
redis.call('RPUSH', KEYS[5], string.format(ARGV[5], version))
return version
"""

# KEYS: cells; ARGV: id, at, then (field index, value) pairs. Facts older than the recorded
# one are dropped, and a decommissioned cell stays so.
_CELL_FACT = """
local n = {n}
local f = {}
for i = 1, n + 1 do f[i] = '' end
f[n + 1] = '0'
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local i = 1
  for part in string.gmatch(cur .. '\\t', '([^\\t]*)\\t') do f[i] = part; i = i + 1 end
end
if f[n] == 'decommissioned' then return 0 end
if tonumber(ARGV[2]) < tonumber(f[n + 1]) then return 0 end
for j = 3, #ARGV, 2 do f[tonumber(ARGV[j])] = ARGV[j + 1] end
f[n + 1] = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], table.concat(f, '\\t'))
return 1
""".replace("{n}", str(len(CELL_FIELDS)))


class Conflict(Exception):
    """The flag changed since it was read."""


def diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any]:
    """Top-level fields that changed: ``{field: {"from": ..., "to": ...}}``."""
    old, new = old or {}, new or {}
    return {
        k: {"from": old.get(k), "to": new.get(k)}
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    }


def parse_cell(cell_id: str, packed: str) -> dict[str, str | None]:
    parts = packed.split("\t")
    cell: dict[str, str | None] = {"id": cell_id}
    for name, value in zip(CELL_FIELDS, parts, strict=False):
        cell[name] = value or None
    return cell


class FlagsStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.outbox = Outbox(redis, OUTBOX)
        self._change = redis.register_script(_CHANGE)
        self._cell_fact = redis.register_script(_CELL_FACT)
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
        self, key: str, *, expected: str | None, new: Flag | None, actor: str, at: datetime
    ) -> int:
        """Write (or, with ``new`` None, delete) a flag read as ``expected``; the new version."""
        old_json = json.loads(expected) if expected else None
        new_json = new.model_dump(mode="json") if new else None
        action = "deleted" if new is None else ("created" if expected is None else "updated")
        entry = {
            "at": at.isoformat(), "actor": actor, "action": action,
            "diff": diff(old_json, new_json), "version": SENTINEL,
        }  # fmt: skip
        event = FlagsChanged(
            at=at, key=key, snapshot_version=SENTINEL, actor=actor, deleted=new is None
        )
        version = await self._change(
            keys=[FLAG + key, KEYS, VERSION, HISTORY + key, OUTBOX],
            args=[
                key, expected or "", new.model_dump_json() if new else "",
                _with_version(json.dumps(entry)), _with_version(outbox_entry(event)),
                HISTORY_KEPT,
            ],
        )  # fmt: skip
        if int(version) < 0:
            raise Conflict(key)
        return int(version)

    async def history(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(e) for e in await self.redis.lrange(HISTORY + key, 0, -1)]

    # -- cells -----------------------------------------------------------------------------------

    async def cell_fact(self, cell_id: str, at: datetime, **fields: str) -> bool:
        pairs: list[str | int] = []
        for name, value in fields.items():
            pairs += [CELL_FIELDS.index(name) + 1, value]
        return bool(await self._cell_fact(keys=[CELLS], args=[cell_id, at.timestamp(), *pairs]))

    # A cell heard of only through liveness events (its creation not seen) is not known yet.

    async def cell(self, cell_id: str) -> dict[str, str | None] | None:
        packed = await self.redis.hget(CELLS, cell_id)
        cell = parse_cell(cell_id, str(packed)) if packed else None
        return cell if cell and cell.get("stage") else None

    async def cells(self) -> list[dict[str, str | None]]:
        packed = await self.redis.hgetall(CELLS)
        cells = (parse_cell(str(k), str(v)) for k, v in packed.items())
        return [c for c in cells if c.get("stage")]


def _with_version(text: str) -> str:
    """A JSON text written with the SENTINEL as its version, as a Lua format string that puts
    the real version (known only inside the script) there."""
    return text.replace("%", "%%").replace(str(SENTINEL), "%d")
