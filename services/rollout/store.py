"""The rollout service's Redis keys.

rollout:release:<version>   string: the published release (JSON, with who and when)
rollout:releases            set: every published version
rollout:rollout:<version>   string: the release's rollout (model.Rollout as JSON)
rollout:policy              string: the rollout policy (JSON; absent: the defaults)
rollout:cell:<id>           hash: what rollout knows of a cell (from events and reports) and the
                            desired state it last sent the cell
rollout:cells               set: every cell id it has heard of
rollout:dirty               set: cells changed by something other than the controller since
                            its last step (facts, outcome reports, pins): what it reloads
rollout:generation          counter: desired-state generations (one sequence for all cells)
rollout:controller          string: the controller's lease (common.lease)
rollout:outbox              list: events and desired-state commands not yet published

Whatever the controller writes (a rollout's new state, desired states, the commands that carry
them and the events that announce them) goes in one Lua script that first checks the lease, so
a step is written whole or not at all, and only by the current holder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from common.lease import FENCE_CHECK
from common.messages import Event, Message, Release
from common.outbox import Outbox, outbox_entry
from services.rollout.model import Assign, CellFacts, Rollout, RolloutPolicy

PREFIX = "rollout:"
RELEASE = PREFIX + "release:"
RELEASES = PREFIX + "releases"
OUTBOX = PREFIX + "outbox"
CELL = PREFIX + "cell:"
CELLS = PREFIX + "cells"
DIRTY = PREFIX + "dirty"
ROLLOUT = PREFIX + "rollout:"
POLICY = PREFIX + "policy"
GENERATION = PREFIX + "generation"
LEASE = PREFIX + "controller"

# KEYS: cell, cells, dirty; ARGV: id, at (epoch), then field, value pairs.
# Events can arrive twice or out of order: a fact older than the one recorded is dropped, and
# a decommissioned cell stays decommissioned.
_CELL_FACT = """
local rec = redis.call('HMGET', KEYS[1], 'fact_at', 'status')
if rec[2] == 'decommissioned' then return 0 end
if rec[1] and tonumber(ARGV[2]) < tonumber(rec[1]) then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'fact_at', ARGV[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS: release, releases, outbox, rollout; ARGV: version, record, event entry, rollout.
# A version is published once: the record, the index, its rollout and the event are written
# together, so publishing is what starts the rollout.
_PUBLISH = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX') == false then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4])
return 1
"""

# A rollout write based on the revision it read: 'stale' if someone wrote in between.
_CHECK_REV = """
local function rev_ok(key, expected)
  if expected == '' then return true end
  local raw = redis.call('GET', key)
  return raw and tostring(cjson.decode(raw)['rev']) == expected
end
"""

# KEYS: rollout; ARGV: expected rev, new rollout.
_SAVE = (
    _CHECK_REV
    + """
if not rev_ok(KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: lease, rollout, outbox, then one per assigned cell.
# ARGV: fence, expected rev ('' writes no rollout), rollout, count of outbox entries, the
# entries, then per cell: version ('' for nothing), generation, at, previous.
_COMMIT = (
    FENCE_CHECK
    + _CHECK_REV
    + """
if not rev_ok(KEYS[2], ARGV[2]) then return -1 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
local n = tonumber(ARGV[4])
for i = 1, n do redis.call('RPUSH', KEYS[3], ARGV[4 + i]) end
local base = 4 + n
for i = 4, #KEYS do
  local a = base + (i - 4) * 4
  redis.call('HSET', KEYS[i], 'desired_version', ARGV[a + 1], 'desired_generation', ARGV[a + 2],
             'desired_at', ARGV[a + 3], 'previous_version', ARGV[a + 4])
end
return 1
"""
)

# KEYS: cell, dirty; ARGV: id, generation, phase, error, at, release version.
# Reports of a generation older than the last one recorded are dropped, and so is a step
# report arriving after its generation's outcome (redelivery can reorder them). Returns 0 if
# dropped, else when the desired state was sent if this is its outcome ('' otherwise).
_REPORT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local rec = redis.call('HMGET', KEYS[1], 'report_generation', 'report_phase',
                      'desired_generation', 'desired_at')
local gen = tonumber(ARGV[2])
local terminal = {succeeded=true, failed=true, rolled_back=true}
if rec[1] then
  local known = tonumber(rec[1])
  if gen < known then return 0 end
  if gen == known and terminal[rec[2]] and not terminal[ARGV[3]] then return 0 end
end
redis.call('HSET', KEYS[1], 'report_generation', ARGV[2], 'report_phase', ARGV[3],
           'report_error', ARGV[4], 'report_at', ARGV[5])
if ARGV[3] == 'succeeded' then redis.call('HSET', KEYS[1], 'installed_release', ARGV[6]) end
-- Only an outcome changes the controller's decisions; the steps before it do not.
if not terminal[ARGV[3]] then return '' end
redis.call('SADD', KEYS[2], ARGV[1])
if rec[3] and tonumber(rec[3]) == gen and rec[4] then return rec[4] end
return ''
"""


# KEYS: cells; ARGV: cell key prefix. Every known cell's hash, as flat field/value arrays.
_ALL_CELLS = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""

# KEYS: dirty; ARGV: cell key prefix. Takes the dirty set: each id with its hash.
_TAKE_DIRTY = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = {id, redis.call('HGETALL', ARGV[1] .. id)}
end
redis.call('DEL', KEYS[1])
return out
"""


@dataclass(frozen=True)
class Recorded:
    """A report that was kept; for the outcome of the cell's desired state, when that was sent."""

    desired_at: datetime | None


class Stale(Exception):
    """A rollout changed between reading it and writing it; read again."""


class FenceLost(Exception):
    """The controller's lease is held by someone else; this holder must stop writing."""


def _facts(raw: dict[str, str]) -> CellFacts:
    def opt(key: str) -> str | None:
        return raw.get(key) or None

    gen = raw.get("desired_generation")
    report_gen = raw.get("report_generation")
    # Written only by this service's scripts: constructed without validating again (a step
    # reads every cell, and validation was most of its time).
    return CellFacts.model_construct(
        id=raw["id"], stage=raw["stage"], status=raw["status"],  # type: ignore[arg-type]
        installed_release=opt("installed_release"), pinned=opt("pinned"),
        held=raw.get("held") == "1",
        desired_version=opt("desired_version"),
        desired_generation=int(gen) if gen else None,
        desired_at=datetime.fromtimestamp(float(raw["desired_at"]), UTC)
        if raw.get("desired_at") else None,
        previous_version=opt("previous_version"),
        report_generation=int(report_gen) if report_gen else None,
        report_phase=opt("report_phase"), report_error=opt("report_error"),
    )  # fmt: skip


class RolloutStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.outbox = Outbox(redis, OUTBOX)
        self._publish = redis.register_script(_PUBLISH)
        self._cell_fact = redis.register_script(_CELL_FACT)
        self._save = redis.register_script(_SAVE)
        self._commit = redis.register_script(_COMMIT)
        self._report = redis.register_script(_REPORT)
        self._all_cells = redis.register_script(_ALL_CELLS)
        self._releases: dict[str, Release] = {}
        self._take_dirty = redis.register_script(_TAKE_DIRTY)

    async def cell_fact(self, cell_id: str, at: datetime, **fields: str) -> bool:
        """Record facts about a cell as of ``at`` (ignored if older than what is recorded)."""
        pairs = [item for kv in fields.items() for item in kv]
        applied = await self._cell_fact(
            keys=[CELL + cell_id, CELLS, DIRTY], args=[cell_id, at.timestamp(), *pairs]
        )
        return bool(applied)

    async def report(
        self,
        cell_id: str,
        *,
        generation: int,
        phase: str,
        error: str | None,
        at: datetime,
        version: str | None,
    ) -> Recorded | None:
        """A cell's upgrade report (None if dropped as stale); a success also records the
        release as installed."""
        result = await self._report(
            keys=[CELL + cell_id, DIRTY],
            args=[cell_id, generation, phase, error or "", at.timestamp(), version or ""],
        )
        if result == 0:
            return None
        sent = datetime.fromtimestamp(float(result), UTC) if result else None
        return Recorded(desired_at=sent)

    async def cell(self, cell_id: str) -> CellFacts | None:
        raw: dict[str, str] = await self.redis.hgetall(CELL + cell_id)  # type: ignore[assignment]
        return _facts(raw) if raw and raw.get("stage") else None

    async def cells(self) -> list[CellFacts]:
        # One script answer for the whole fleet: redis-py reads each reply of a pipeline under
        # its own timeout, which cost more than Redis's work at a thousand cells.
        flat = await self._all_cells(keys=[CELLS], args=[CELL])
        cells = []
        for pairs in flat:
            raw = dict(zip(pairs[::2], pairs[1::2], strict=True))
            if raw.get("stage"):
                cells.append(_facts(raw))
        return sorted(cells, key=lambda c: c.id)

    async def set_pin(self, cell_id: str, version: str | None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(CELL + cell_id, "pinned", version or "")
        pipe.sadd(DIRTY, cell_id)
        await pipe.execute()

    async def changed_cells(self) -> tuple[list[CellFacts], list[str]]:
        """The cells changed since the last call (taken off the dirty set): their facts, and
        the ids of those that are gone."""
        flat = await self._take_dirty(keys=[DIRTY], args=[CELL])
        cells, gone = [], []
        for cell_id, pairs in flat:
            raw = dict(zip(pairs[::2], pairs[1::2], strict=True))
            if raw.get("stage"):
                cells.append(_facts(raw))
            else:
                gone.append(str(cell_id))
        return cells, gone

    async def forget_changes(self) -> None:
        """Before a full load: whatever changes after it is in the dirty set again."""
        await self.redis.delete(DIRTY)

    # -- policy and rollouts ---------------------------------------------------------------------

    async def policy(self) -> RolloutPolicy:
        raw = await self.redis.get(POLICY)
        return RolloutPolicy.model_validate_json(raw) if raw else RolloutPolicy()

    async def set_policy(self, policy: RolloutPolicy) -> None:
        await self.redis.set(POLICY, policy.model_dump_json())

    async def rollout(self, version: str) -> Rollout | None:
        raw = await self.redis.get(ROLLOUT + version)
        return Rollout.model_validate_json(raw) if raw else None

    async def rollouts(self) -> list[Rollout]:
        versions = await self.versions()
        raws = await self.redis.mget([ROLLOUT + v for v in versions]) if versions else []
        return [Rollout.model_validate_json(raw) for raw in raws if raw]

    async def save_rollout(self, rollout: Rollout, expected_rev: int) -> None:
        """An operator's change to a rollout, refused with Stale if it changed since read."""
        new = rollout.model_copy(update={"rev": expected_rev + 1})
        if not await self._save(
            keys=[ROLLOUT + rollout.version], args=[str(expected_rev), new.model_dump_json()]
        ):
            raise Stale(rollout.version)

    async def generations(self, count: int) -> list[int]:
        """``count`` fresh generations; gaps from a step that was not written are harmless."""
        last = int(await self.redis.incrby(GENERATION, count))
        return list(range(last - count + 1, last + 1))

    async def commit(
        self,
        fence: str,
        *,
        rollout: Rollout | None = None,
        expected_rev: int | None = None,
        assign: Sequence[tuple[Assign, int]] = (),
        at: datetime,
        messages: Sequence[Message] = (),
    ) -> Rollout | None:
        """Write one controller step whole: the rollout's new state (if it read revision
        ``expected_rev``), the cells' desired states and the messages announcing them. The
        rollout as written (its revision bumped) is returned."""
        new = None
        if rollout is not None:
            assert expected_rev is not None
            new = rollout.model_copy(update={"rev": expected_rev + 1})
        args: list[str | int | float] = [
            fence, "" if new is None else str(expected_rev), new.model_dump_json() if new else "",
            len(messages), *(outbox_entry(m) for m in messages),
        ]  # fmt: skip
        for a, generation in assign:
            args += [a.version or "", generation, at.timestamp(), a.previous or ""]
        rollout_key = ROLLOUT + (rollout.version if rollout else "-")
        written = await self._commit(
            keys=[LEASE, rollout_key, OUTBOX, *(CELL + a.cell_id for a, _ in assign)], args=args
        )
        if written == 0:
            raise FenceLost(fence)
        if written == -1:
            raise Stale(rollout_key)
        return new

    async def publish(
        self, release: Release, *, at: datetime, by: str, event: Event, rollout: Rollout
    ) -> bool:
        record = {
            "release": release.model_dump(mode="json"),
            "published_at": at.isoformat(),
            "published_by": by,
        }
        created = await self._publish(
            keys=[RELEASE + release.version, RELEASES, OUTBOX, ROLLOUT + release.version],
            args=[
                release.version,
                json.dumps(record),
                outbox_entry(event),
                rollout.model_dump_json(),
            ],
        )
        return bool(created)

    async def get(self, version: str) -> dict[str, Any] | None:
        raw = await self.redis.get(RELEASE + version)
        return json.loads(raw) if raw else None

    async def release(self, version: str | None) -> Release | None:
        """A published release (None for none); kept once read, as a release never changes."""
        if version is None:
            return None
        release = self._releases.get(version)
        if release is None:
            record = await self.get(version)
            if record is None:
                raise LookupError(f"release {version} is not published")
            release = self._releases[version] = Release.model_validate(record["release"])
        return release

    async def versions(self) -> list[str]:
        return [str(v) for v in await self.redis.smembers(RELEASES)]
