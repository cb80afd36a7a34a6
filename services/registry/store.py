"""The registry's Redis keys, behind one class.

    registry:cell:<id>            hash: the cell record (see CellView)
    registry:cells                set: every cell id ever created (records are kept as history)
    registry:status:<status>      set: cell ids by status, kept in step with the records
    registry:stage:<stage>        set: cell ids by stage
    registry:liveness             sorted set: online cell id -> last heartbeat (registry clock)
    registry:rotations            sorted set: cell id -> when an unconfirmed rotation started
    registry:refusals:<id>        list: the latest refused registrations of a cell
    registry:creating:<id>        string: a create in progress (expires)
    registry:outbox               list: events not yet published (common.outbox)
    registry:flags_version        string: the newest flags snapshot version announced

Every transition that implies an event writes the event to the outbox in the same Lua script,
so state and event never disagree. The scripts touch keys derived from the cell id, which is
fine on one Redis (with replicas) but would need hash tags on Redis Cluster.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from common.messages import STAGES, CellOffline, CellOnline, Event
from common.outbox import Outbox, outbox_entry
from common.redis_pipeline import BatchedScript
from services.registry.model import STATUSES, CellStatus, CellView, CreateCell

PREFIX = "registry:"
CELL = PREFIX + "cell:"
OUTBOX = PREFIX + "outbox"
LIVENESS = PREFIX + "liveness"
ROTATIONS = PREFIX + "rotations"
MAINTENANCE = PREFIX + "maintenance"
REFUSALS_KEPT = 20
FLAGS_VERSION = PREFIX + "flags_version"

# KEYS: flags version; ARGV: version.
_RAISE_FLAGS = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS: flags version; ARGV: key prefix. One pass over the online cells, inside Redis.
_FLAGS_BEHIND = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local behind = {}
if current == 0 then return behind end
for _, id in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'status:online')) do
  local raw = redis.call('HGET', ARGV[1] .. 'cell:' .. id, 'flags_snapshot_version')
  local held = tonumber(raw or '')
  if not held or held < current then behind[#behind + 1] = id end
end
return behind
"""

_LUA_COMMON = """
local prefix = 'registry:'
local function move(id, from, to)
  if from == to then return end
  if from then redis.call('SREM', prefix .. 'status:' .. from, id) end
  redis.call('SADD', prefix .. 'status:' .. to, id)
end
"""

# KEYS: cell, liveness, outbox
# ARGV: id, account, seq, incarnation, now_iso, now_epoch, agent_version, stack_name,
#       template_version, installed_release, event_entry
_REGISTER = (
    _LUA_COMMON
    + """
local rec = redis.call('HMGET', KEYS[1], 'status', 'aws_account_id', 'last_seq', 'incarnation',
                       'registered_at')
local status = rec[1]
if not status then return {'refused', 'unknown_cell', ''} end
if status == 'decommissioned' then return {'refused', 'decommissioned', ''} end
local bound = rec[2]
if bound and bound ~= '' and bound ~= ARGV[2] then return {'refused', 'account', bound} end
local seq = tonumber(ARGV[3])
if rec[4] == ARGV[4] and seq <= (tonumber(rec[3]) or -1) then return {'stale', status, ''} end
redis.call('HSET', KEYS[1], 'status', 'online', 'aws_account_id', ARGV[2], 'last_seq', ARGV[3],
           'incarnation', ARGV[4], 'last_heartbeat_at', ARGV[5], 'agent_version', ARGV[7],
           'stack_name', ARGV[8], 'infra_template_version', ARGV[9],
           'installed_release', ARGV[10])
if not rec[5] or rec[5] == '' then redis.call('HSET', KEYS[1], 'registered_at', ARGV[5]) end
move(ARGV[1], status, 'online')
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[11])
return {'registered', status, ''}
"""
)

# ARGV[1]: JSON array of heartbeats, each [id, seq, now_iso, now_epoch, fields, credential_id]
# where fields is [name, value, name, value, ...]. Returns "<outcome>:<confirmed>" for each.
# Heartbeats arrive by the thousand per second; they are applied in batches (one script call
# per event-loop turn, see common.redis_pipeline) because the client's cost is per call.
_HEARTBEATS = (
    _LUA_COMMON
    + """
local out = {}
for i, hb in ipairs(cjson.decode(ARGV[1])) do
  local id, seq, now_iso, cred = hb[1], hb[2], hb[3], hb[6]
  local key = prefix .. 'cell:' .. id
  local rec = redis.call('HMGET', key, 'status', 'last_seq', 'pending_credential_id')
  local status = rec[1]
  if not status then
    out[i] = 'unknown_cell:0'
  elseif status ~= 'online' and status ~= 'offline' then
    out[i] = 'not_registered:0'
  elseif seq <= (tonumber(rec[2]) or -1) then
    out[i] = 'stale:0'
  else
    redis.call('HSET', key, 'status', 'online', 'last_seq', seq, 'last_heartbeat_at', now_iso,
               unpack(hb[5]))
    local confirmed = 0
    if cred ~= '' and rec[3] and rec[3] ~= '' and rec[3] == cred then
      redis.call('HSET', key, 'credential_id', cred, 'pending_credential_id', '',
                 'rotation_started_at', '')
      redis.call('ZREM', prefix .. 'rotations', id)
      confirmed = 1
    end
    redis.call('ZADD', prefix .. 'liveness', hb[4], id)
    if status == 'offline' then
      move(id, 'offline', 'online')
      local outbox = prefix .. 'outbox'
      local n = redis.call('INCR', outbox .. ':seq')
      local body = cjson.encode({cell_id = id, at = now_iso})
      redis.call('RPUSH', outbox, cjson.encode({id = 'registry-online-' .. n,
                                                type = '%s', body = body}))
      out[i] = 'back_online:' .. confirmed
    else
      out[i] = 'applied:' .. confirmed
    end
  end
end
return out
""".replace("%s", CellOnline.wire_name)
)

# KEYS: cell, maintenance
# ARGV: id, seq, enabled ('1' or '0'), now_iso, now_epoch, until_iso
# Ordered by the report's own sequence number, apart from heartbeats' (both share the counter).
_MAINTENANCE = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'last_maintenance_seq',
                       'maintenance_since_epoch')
if not rec[1] or rec[1] == 'decommissioned' then return {'ignored', '0'} end
if tonumber(ARGV[2]) <= (tonumber(rec[2]) or -1) then return {'stale', '0'} end
redis.call('HSET', KEYS[1], 'last_maintenance_seq', ARGV[2])
if ARGV[3] == '1' then
  if not rec[3] or rec[3] == '' then
    redis.call('HSET', KEYS[1], 'maintenance_since', ARGV[4], 'maintenance_since_epoch', ARGV[5])
    redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  end
  redis.call('HSET', KEYS[1], 'maintenance', '1', 'maintenance_until', ARGV[6])
  return {'entered', '0'}
end
local took = 0
if rec[3] and rec[3] ~= '' then took = math.max(0, tonumber(ARGV[5]) - tonumber(rec[3])) end
redis.call('HSET', KEYS[1], 'maintenance', '0', 'maintenance_since', '',
           'maintenance_since_epoch', '', 'maintenance_until', '')
redis.call('HINCRBYFLOAT', KEYS[1], 'maintenance_seconds_total', took)
redis.call('ZREM', KEYS[2], ARGV[1])
return {'left', tostring(took)}
"""

# KEYS: liveness, outbox
# ARGV: cutoff_epoch, now_iso, limit
_SWEEP = (
    _LUA_COMMON
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local key = prefix .. 'cell:' .. id
  local rec = redis.call('HMGET', key, 'status', 'last_heartbeat_at')
  redis.call('ZREM', KEYS[1], id)
  if rec[1] == 'online' then
    redis.call('HSET', key, 'status', 'offline')
    move(id, 'online', 'offline')
    local n = redis.call('INCR', KEYS[2] .. ':seq')
    local last = cjson.null
    if rec[2] and rec[2] ~= '' then last = rec[2] end
    local body = cjson.encode({cell_id = id, last_heartbeat_at = last, at = ARGV[2]})
    redis.call('RPUSH', KEYS[2], cjson.encode({id = 'registry-offline-' .. n,
                                               type = '%s', body = body}))
    table.insert(out, id)
  end
end
return out
""".replace("%s", CellOffline.wire_name)
)

# KEYS: cell, liveness, outbox, rotations
# ARGV: id, now_iso, event_entry
_DECOMMISSION = (
    _LUA_COMMON
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown_cell' end
if status == 'decommissioned' then return 'already' end
redis.call('HSET', KEYS[1], 'status', 'decommissioned', 'decommissioned_at', ARGV[2],
           'pending_credential_id', '', 'rotation_started_at', '')
move(ARGV[1], status, 'decommissioned')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 'decommissioned'
"""
)


def _s(value: object) -> str:
    """Redis hashes hold strings; None is stored as ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _view(raw: dict[str, str], refusals: list[str]) -> CellView:
    fields: dict[str, Any] = {k: (v if v != "" else None) for k, v in raw.items()}
    fields["maintenance"] = raw.get("maintenance") == "1"
    fields["credentials_pending"] = bool(raw.get("pending_credential_id"))
    fields["refused_registrations"] = [json.loads(r) for r in refusals]
    return CellView.model_validate(fields)


class RegistryStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.outbox = Outbox(redis, OUTBOX)
        self._register = redis.register_script(_REGISTER)
        self._sweep = redis.register_script(_SWEEP)
        self._decommission = redis.register_script(_DECOMMISSION)
        self._maintenance = redis.register_script(_MAINTENANCE)
        self._raise_flags = redis.register_script(_RAISE_FLAGS)
        self._behind = redis.register_script(_FLAGS_BEHIND)
        self._heartbeats = BatchedScript(redis, _HEARTBEATS)

    # -- creating -----------------------------------------------------------------------------

    async def reserve(self, cell_id: str, ttl: int = 120) -> str | None:
        """Claim ``cell_id`` for creation. Returns why it cannot be claimed, or None."""
        if await self.redis.exists(CELL + cell_id):
            return f"cell {cell_id!r} already exists"
        if not await self.redis.set(f"{PREFIX}creating:{cell_id}", "1", nx=True, ex=ttl):
            return f"cell {cell_id!r} is being created by another request"
        return None

    async def release(self, cell_id: str) -> None:
        await self.redis.delete(f"{PREFIX}creating:{cell_id}")

    async def create(
        self, cell: CreateCell, now: datetime, credential_id: str, event: Event
    ) -> None:
        record: dict[Any, Any] = {
            "id": cell.id,
            "stage": cell.stage,
            "region": cell.region,
            "org": cell.org,
            "status": "created",
            "created_at": now.isoformat(),
            "aws_account_id": cell.aws_account or "",
            "credential_id": credential_id,
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(CELL + cell.id, mapping=record)
        pipe.sadd(PREFIX + "cells", cell.id)
        pipe.sadd(f"{PREFIX}status:created", cell.id)
        pipe.sadd(f"{PREFIX}stage:{cell.stage}", cell.id)
        pipe.rpush(OUTBOX, outbox_entry(event))
        pipe.delete(f"{PREFIX}creating:{cell.id}")
        await pipe.execute()

    # -- reading ------------------------------------------------------------------------------

    async def get(self, cell_id: str) -> CellView | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(CELL + cell_id)
        pipe.lrange(f"{PREFIX}refusals:{cell_id}", 0, -1)
        raw, refusals = await pipe.execute()
        return _view(raw, refusals) if raw else None

    async def find(
        self, stage: str | None = None, status: CellStatus | None = None
    ) -> list[CellView]:
        sets = [PREFIX + "cells"]
        if stage:
            sets.append(f"{PREFIX}stage:{stage}")
        if status:
            sets.append(f"{PREFIX}status:{status}")
        ids = sorted(str(i) for i in await self.redis.sinter(sets))
        pipe = self.redis.pipeline(transaction=False)
        for cell_id in ids:
            pipe.hgetall(CELL + cell_id)
        records = await pipe.execute()
        return [_view(raw, []) for raw in records if raw]

    async def counts(self) -> dict[tuple[str, str], int]:
        """Cells by (stage, status)."""
        pipe = self.redis.pipeline(transaction=False)
        keys = [(stage, status) for stage in STAGES for status in STATUSES]
        for stage, status in keys:
            pipe.sintercard(2, [f"{PREFIX}stage:{stage}", f"{PREFIX}status:{status}"])
        return dict(zip(keys, await pipe.execute(), strict=True))

    async def raise_flags_version(self, version: int) -> None:
        """The newest snapshot version announced (events may arrive out of order)."""
        await self._raise_flags(keys=[FLAGS_VERSION], args=[version])

    async def flags_version(self) -> int:
        return int(await self.redis.get(FLAGS_VERSION) or 0)

    async def flags_behind(self) -> list[str]:
        """Online cells whose last heartbeat showed an older flags snapshot (or none)."""
        return [str(c) for c in await self._behind(keys=[FLAGS_VERSION], args=[PREFIX])]

    async def oldest_heartbeat_epoch(self) -> float | None:
        oldest = await self.redis.zrange(LIVENESS, 0, 0, withscores=True)
        return float(oldest[0][1]) if oldest else None

    # -- reports ------------------------------------------------------------------------------

    async def register(
        self,
        cell_id: str,
        *,
        account: str,
        seq: int,
        incarnation: str,
        now: datetime,
        agent_version: str,
        stack_name: str | None,
        template_version: str | None,
        installed_release: str | None,
        event: Event,
    ) -> tuple[str, str, str]:
        """Returns (outcome, previous status or refusal reason, bound account)."""
        result = await self._register(
            keys=[CELL + cell_id, LIVENESS, OUTBOX],
            args=[
                cell_id, account, seq, incarnation, now.isoformat(), now.timestamp(),
                agent_version, _s(stack_name), _s(template_version), _s(installed_release),
                outbox_entry(event),
            ],
        )  # fmt: skip
        outcome, detail, bound = result
        return str(outcome), str(detail), str(bound)

    async def record_refusal(self, cell_id: str, refusal: dict[str, Any], event: Event) -> None:
        pipe = self.redis.pipeline(transaction=True)
        key = f"{PREFIX}refusals:{cell_id}"
        pipe.lpush(key, json.dumps(refusal))
        pipe.ltrim(key, 0, REFUSALS_KEPT - 1)
        pipe.rpush(OUTBOX, outbox_entry(event))
        await pipe.execute()

    async def heartbeat(
        self,
        cell_id: str,
        *,
        seq: int,
        now: datetime,
        agent_version: str,
        installed_release: str | None,
        applied_generation: int | None,
        maintenance: bool,
        template_version: str | None,
        flags_snapshot_version: int | None,
        credential_id: str | None,
    ) -> tuple[str, bool]:
        """Returns (outcome, whether this heartbeat confirmed a credential rotation)."""
        fields = [
            "agent_version", agent_version,
            "installed_release", _s(installed_release),
            "applied_generation", _s(applied_generation),
            "maintenance", _s(maintenance),
            "infra_template_version", _s(template_version),
            "flags_snapshot_version", _s(flags_snapshot_version),
        ]  # fmt: skip
        result = await self._heartbeats(
            cell_id, seq, now.isoformat(), now.timestamp(), fields, _s(credential_id)
        )
        outcome, _, confirmed = str(result).partition(":")
        return outcome, confirmed == "1"

    async def maintenance(
        self, cell_id: str, *, seq: int, enabled: bool, now: datetime, until: datetime | None
    ) -> tuple[str, float]:
        """Returns (entered|left|stale|ignored, seconds the maintenance took when it left)."""
        outcome, took = await self._maintenance(
            keys=[CELL + cell_id, MAINTENANCE],
            args=[cell_id, seq, _s(enabled), now.isoformat(), now.timestamp(), _s(until)],
        )
        return str(outcome), float(took)

    async def oldest_maintenance_epoch(self) -> float | None:
        oldest = await self.redis.zrange(MAINTENANCE, 0, 0, withscores=True)
        return float(oldest[0][1]) if oldest else None

    async def sweep_offline(self, cutoff: datetime, now: datetime, limit: int = 1000) -> list[str]:
        """Mark online cells whose last heartbeat is at or before ``cutoff`` offline."""
        ids = await self._sweep(
            keys=[LIVENESS, OUTBOX], args=[cutoff.timestamp(), now.isoformat(), limit]
        )
        return [str(i) for i in ids]

    # -- credentials and decommissioning ------------------------------------------------------

    async def start_rotation(self, cell_id: str, credential_id: str, now: datetime) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            CELL + cell_id,
            mapping={
                "pending_credential_id": credential_id,
                "rotation_started_at": now.isoformat(),
            },
        )
        pipe.zadd(ROTATIONS, {cell_id: now.timestamp()})
        await pipe.execute()

    async def overdue_rotations(self, started_before: datetime) -> list[str]:
        ids = await self.redis.zrangebyscore(ROTATIONS, "-inf", started_before.timestamp())
        return [str(i) for i in ids]

    async def end_rotation(self, cell_id: str) -> None:
        """Give up waiting for a confirmation: the credential in force is the new one."""
        pending = str(await self.redis.hget(CELL + cell_id, "pending_credential_id") or "")
        pipe = self.redis.pipeline(transaction=True)
        if pending:
            pipe.hset(
                CELL + cell_id,
                mapping={
                    "credential_id": pending,
                    "pending_credential_id": "",
                    "rotation_started_at": "",
                },
            )
        pipe.zrem(ROTATIONS, cell_id)
        await pipe.execute()

    async def decommission(self, cell_id: str, now: datetime, event: Event) -> str:
        result = await self._decommission(
            keys=[CELL + cell_id, LIVENESS, OUTBOX, ROTATIONS],
            args=[cell_id, now.isoformat(), outbox_entry(event)],
        )
        return str(result)
