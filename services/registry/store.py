"""The registry's Redis keys, behind one class. It applies what ``transitions.py`` decides.

    registry:cell:<id>            hash: the cell record, its fields and their types defined once
                                  (services/registry/record.py, CellFields)
    registry:cells                set: every cell id ever created (records are kept as history)
    registry:status:<status>      set: cell ids by status, kept in step with the records
    registry:stage:<stage>        set: cell ids by stage
    registry:org:<org>            set: cell ids by org
    registry:ids                  sorted set: every cell id, all scored 0, so in id order (the
                                  order of a listing, read a page at a time)
    registry:liveness             sorted set: online cell id -> last heartbeat (registry clock)
    registry:rotations            sorted set: cell id -> when an unconfirmed rotation started
    registry:maintenance          sorted set: cell id -> when its stay in maintenance began
    registry:refusals:<id>        list: the latest refused registrations of a cell
    registry:audit:<id>           sorted set: the cell's debug-access reports by its sequence
    registry:creating:<id>        string: a create in progress (expires)
    registry:outbox               list: events not yet published (common.outbox)
    registry:flags_version        string: the newest flags snapshot version announced
    registry:queues               hash: cell id -> the fingerprint of the command queue topology
                                  last declared for it (common.topology.Topology.fingerprint)

A transition is written as one Change (common.scripts): its fields, the index sets and sorted
sets that follow from them, and its event into the outbox, all only if the fields the decision
read still hold what they held. When they do not, the record as it is now comes back in the
same reply and the transition is decided again. The index keys follow from the record's fields
here and nowhere else.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from pydantic import TypeAdapter

from common.bus.errors import TryAgain
from common.outbox import Outbox, outbox_entry
from common.requests.registry import AuditEntry, CellsCreate, CellView, Match
from common.scripts import Change, Changes, Hashes, encode
from common.vocabulary import CELL_STATUSES, STAGES
from services.registry import transitions
from services.registry.record import CellRecord
from services.registry.transitions import Outcome, Transition, assumed_online

PREFIX = "registry:"
CELL = PREFIX + "cell:"
CELLS = PREFIX + "cells"
STATUS = PREFIX + "status:"
STAGE = PREFIX + "stage:"
OUTBOX = PREFIX + "outbox"
LIVENESS = PREFIX + "liveness"
ROTATIONS = PREFIX + "rotations"
MAINTENANCE = PREFIX + "maintenance"
REFUSALS = PREFIX + "refusals:"
AUDIT = PREFIX + "audit:"
CREATING = PREFIX + "creating:"
FLAGS_VERSION = PREFIX + "flags_version"
QUEUES = PREFIX + "queues"
IDS = PREFIX + "ids"
ORG = PREFIX + "org:"
# The tests a selector's "=" finds in an index set (of that field's value).
INDEXED = {"stage": STAGE, "status": STATUS, "org": ORG}
REFUSALS_KEPT = 20
# How often a transition is decided again when the record keeps changing under it. The writers
# of one cell's record are few (its own reports, the sweep, an operator), so a second try
# almost always succeeds; running out means something is wrong, and the message is redelivered.
CONFLICT_RETRIES = 8

Decide = Callable[[CellRecord], Transition]
V = TypeVar("V", bound=CellView)
Assumed = tuple[Mapping[str, str], CellRecord]


class Contention(TryAgain):
    """A cell's record kept changing while a transition was being written: the delivery goes
    back to its queue at once (common.bus.errors.TryAgain)."""


def _fields(raw: Mapping[str, str], refusals: list[str]) -> dict[str, object]:
    fields: dict[str, object] = {k: (v if v != "" else None) for k, v in raw.items()}
    fields["maintenance"] = raw.get("maintenance") == "1"
    fields["credentials_pending"] = bool(raw.get("pending_credential_id"))
    fields["refused_registrations"] = [json.loads(r) for r in refusals]
    return fields


def view(raw: Mapping[str, str], refusals: list[str]) -> CellView:
    """What an operator sees of the record ``raw``."""
    return CellView.model_validate(_fields(raw, refusals))


def views_as(
    model: type[V], raws: Sequence[Mapping[str, str]], more: Sequence[Mapping[str, object]]
) -> list[V]:
    """Each record as ``model``, a view that adds its ``more`` to CellView: validated in one
    call for the whole page (a call per record was a fifth of a listing's time)."""
    adapter = _LIST_ADAPTERS.get(model)
    if adapter is None:
        adapter = _LIST_ADAPTERS[model] = TypeAdapter(list[model])  # type: ignore[valid-type]
    views: list[V] = adapter.validate_python(
        [{**_fields(raw, []), **extra} for raw, extra in zip(raws, more, strict=True)]
    )
    return views


_LIST_ADAPTERS: dict[type[CellView], TypeAdapter[Any]] = {}


def _passes(m: Match, raw: Mapping[str, str]) -> bool:
    return (raw.get(m.field, "") == m.value) == (m.op == "=")


def _index(change: Change, key: str, member: str, when: object) -> None:
    """A sorted-set index entry that follows a time field: set, or removed when cleared."""
    if isinstance(when, datetime):
        change.run("ZADD", key, when.timestamp(), member)
    else:
        change.run("ZREM", key, member)


def change_for(cell_id: str, raw: Mapping[str, str], t: Transition) -> Change:
    """The Change that writes ``t`` to the record ``raw`` was read as."""
    key = CELL + cell_id
    change = Change(key).reading(key)
    for name in t.read:
        change.expecting(key, name, raw.get(name, ""))
    if t.newer is not None:
        change.if_newer(key, *t.newer)
    change.hset(key, t.changes)
    for name, seconds in t.add.items():
        change.run("HINCRBYFLOAT", key, name, seconds)
    was = raw.get("status") or None
    status = t.changes.get("status", was)
    if "status" in t.changes:
        assert "status" in t.read, "a status change must be decided on the status it read"
        assert isinstance(status, str)
        change.move(STATUS, cell_id, was, status)
        if status != "online":
            change.run("ZREM", LIVENESS, cell_id)
    if "last_heartbeat_at" in t.changes and status == "online":
        _index(change, LIVENESS, cell_id, t.changes["last_heartbeat_at"])
    if "rotation_started_at" in t.changes:
        _index(change, ROTATIONS, cell_id, t.changes["rotation_started_at"])
    if "maintenance_since" in t.changes:
        _index(change, MAINTENANCE, cell_id, t.changes["maintenance_since"])
    if "stage" in t.changes:
        change.run("SADD", CELLS, cell_id).run("SADD", STAGE + encode(t.changes["stage"]), cell_id)
        change.run("ZADD", IDS, 0, cell_id)
    if t.changes.get("org"):
        change.run("SADD", ORG + encode(t.changes["org"]), cell_id)
    if t.refusal is not None:
        change.push_newest(REFUSALS + cell_id, t.refusal.model_dump_json(), REFUSALS_KEPT)
    if t.audit is not None:
        # NX: a redelivered report is the same line, kept once.
        change.run("ZADD", AUDIT + cell_id, "NX", t.audit.seq, t.audit.model_dump_json())
    for event in t.events:
        change.push(OUTBOX, outbox_entry(event))
    return change


class RegistryStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.outbox = Outbox(redis, OUTBOX)
        self._changes = Changes(redis)
        self._hashes = Hashes(redis)
        # The assumed record of a heartbeat, by template version (there are a handful).
        self._assumed: dict[str | None, Assumed] = {}

    # -- transitions ----------------------------------------------------------------------------

    async def transition(
        self,
        cell_id: str,
        decide: Decide,
        *,
        assume: Assumed | None = None,
        also: Callable[[Change], None] | None = None,
    ) -> Transition:
        """Decide on the record and write the decision, deciding again (on the record as it is
        now) while the record changes under it. ``assume``: decide first on these fields (and
        the record they make) instead of reading it; the guess is checked like any read.
        ``also``: adds writes of the caller's own to the same Change."""
        raw: Mapping[str, str]
        if assume is not None:
            raw, record = assume
        else:
            raw = await self._raw(cell_id)
            record = CellRecord.from_fields(raw)
        for _ in range(CONFLICT_RETRIES):
            t = decide(record)
            if not t.writes:
                return t
            change = change_for(cell_id, raw, t)
            if also is not None:
                also(change)
            applied = await self._changes.apply(change)
            if applied.written:
                return t
            raw = applied.read
            record = CellRecord.from_fields(raw)
        raise Contention(f"cell {cell_id}'s record kept changing; try again")

    async def _raw(self, cell_id: str) -> dict[str, str]:
        raw: dict[str, str] = await self.redis.hgetall(CELL + cell_id)  # type: ignore[assignment]
        return raw

    async def create(self, cell: CellsCreate, now: datetime, credential_id: str) -> Transition:
        def free_the_id(change: Change) -> None:
            change.run("DEL", CREATING + cell.id)

        return await self.transition(
            cell.id, lambda r: transitions.create(r, cell, credential_id, now), also=free_the_id
        )

    async def heartbeat(
        self, cell_id: str, template_version: str | None, decide: Decide
    ) -> Transition:
        """The hot path: decided first on an online cell with no rotation waiting, on the
        template version the heartbeat reports, so a heartbeat is one round trip (shared with
        the others in flight)."""
        assumed = self._assumed.get(template_version)
        if assumed is None:
            raw = assumed_online(template_version)
            assumed = self._assumed[template_version] = (raw, CellRecord.from_fields(raw))
        return await self.transition(cell_id, decide, assume=assumed)

    # -- creating -----------------------------------------------------------------------------

    async def reserve(self, cell_id: str, ttl: int = 120) -> str | None:
        """Claim ``cell_id`` for creation. Returns why it cannot be claimed, or None."""
        status = await self.redis.hget(CELL + cell_id, "status")
        if status in (b"decommissioned", "decommissioned"):
            # Its record stays (audit, history); a new cell under its name would inherit them.
            return f"cell {cell_id!r} was decommissioned; ids are not reused, choose another"
        if status is not None:  # every record has a status from its creation
            return f"cell {cell_id!r} already exists"
        if not await self.redis.set(CREATING + cell_id, "1", nx=True, ex=ttl):
            return f"cell {cell_id!r} is being created by another request"
        return None

    async def release(self, cell_id: str) -> None:
        await self.redis.delete(CREATING + cell_id)

    async def queue_declared(self, cell_id: str) -> str | None:
        """The fingerprint of the command queue topology last declared for the cell."""
        found = await self.redis.hget(QUEUES, cell_id)
        return None if found is None else str(found)

    async def set_queue_declared(self, cell_id: str, fingerprint: str) -> None:
        await self.redis.hset(QUEUES, cell_id, fingerprint)

    # -- reading ------------------------------------------------------------------------------

    async def get(self, cell_id: str) -> CellView | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(CELL + cell_id)
        pipe.lrange(REFUSALS + cell_id, 0, -1)
        raw, refusals = await pipe.execute()
        return view(raw, refusals) if raw else None

    async def find(
        self,
        matches: Sequence[Match] = (),
        *,
        after: str | None = None,
        limit: int | None = None,
        decommissioned: bool = True,
    ) -> list[dict[str, str]]:
        """The records (see :func:`view`) of the cells by id that pass every test of
        ``matches``, those after ``after``, at most ``limit``. Without ``decommissioned`` the
        decommissioned ones are left out. All of it before the page is cut.

        The ids come from an index: the intersection of the sets of the tests on stage,
        status and org (sorted; as many ids as those sets hold), or else every id in order
        (``registry:ids``, read a page at a time). Records are read a page at a time and the
        other tests applied to them, until the page is full."""
        indexed = [m for m in matches if m.op == "=" and m.field in INDEXED]
        rest = [m for m in matches if m not in indexed]
        if not decommissioned:
            rest.append(Match(field="status", op="!=", value="decommissioned"))
        want = limit if limit is not None else 1 << 62
        chunk = max(min(want, 5000), 256)
        ids = await self._ids_from_sets(indexed, after) if indexed else None
        found: list[dict[str, str]] = []
        last, offset = after, 0
        while len(found) < want:
            if ids is not None:
                batch, offset = ids[offset : offset + chunk], offset + chunk
            else:
                batch = await self._ids_after(last, chunk)
            if not batch:
                break
            last = batch[-1]
            for raw in await self._hashes.as_json(CELL, ids=batch):
                if raw and all(_passes(m, raw) for m in rest):
                    found.append(raw)
                    if len(found) == want:
                        break
        return found

    async def _ids_from_sets(self, indexed: list[Match], after: str | None) -> list[str]:
        keys = [CELLS, *(INDEXED[m.field] + m.value for m in indexed)]
        ids = sorted(str(i) for i in await self.redis.sinter(keys))
        return ids[bisect.bisect_right(ids, after) :] if after is not None else ids

    async def _ids_after(self, after: str | None, count: int) -> list[str]:
        start = "(" + after if after is not None else "-"
        found = await self.redis.zrangebylex(IDS, start, "+", start=0, num=count)
        return [str(i) for i in found]

    async def build_indexes(self) -> int:
        """Add to the indexes that came after the records (``registry:ids``, by org) every cell
        created before them; how many were added. Run at start; adding is idempotent, and
        every cell created since is indexed as it is created."""
        if await self.redis.zcard(IDS) == await self.redis.scard(CELLS):
            return 0
        orgs = await self._hashes.field(CELL, "org", members_of=CELLS)
        for i in range(0, len(orgs), 5000):
            pipe = self.redis.pipeline(transaction=False)
            part = orgs[i : i + 5000]
            pipe.zadd(IDS, dict.fromkeys((cell_id for cell_id, _ in part), 0))
            for cell_id, org in part:
                if org:
                    pipe.sadd(ORG + org, cell_id)
            await pipe.execute()
        return len(orgs)

    async def counts(self) -> dict[tuple[str, str], int]:
        """Cells by (stage, status)."""
        pipe = self.redis.pipeline(transaction=False)
        keys = [(stage, status) for stage in STAGES for status in CELL_STATUSES]
        for stage, status in keys:
            pipe.sintercard(2, [STAGE + stage, STATUS + status])
        return dict(zip(keys, await pipe.execute(), strict=True))

    async def raise_flags_version(self, version: int) -> None:
        """The newest snapshot version announced (events may arrive out of order)."""
        change = Change().if_newer(FLAGS_VERSION, "", version).run("SET", FLAGS_VERSION, version)
        await self._changes.apply(change)

    async def flags_version(self) -> int:
        return int(await self.redis.get(FLAGS_VERSION) or 0)

    async def flags_behind(self) -> list[str]:
        """Online cells whose last heartbeat showed an older flags snapshot (or none)."""
        current = await self.flags_version()
        if current == 0:
            return []
        held = await self._hashes.field(
            CELL, "flags_snapshot_version", members_of=STATUS + "online"
        )
        return [cell_id for cell_id, version in held if not version or int(version) < current]

    async def oldest_heartbeat_epoch(self) -> float | None:
        oldest = await self.redis.zrange(LIVENESS, 0, 0, withscores=True)
        return float(oldest[0][1]) if oldest else None

    async def oldest_maintenance_epoch(self) -> float | None:
        oldest = await self.redis.zrange(MAINTENANCE, 0, 0, withscores=True)
        return float(oldest[0][1]) if oldest else None

    # -- liveness and rotations ---------------------------------------------------------------

    async def sweep_offline(self, cutoff: datetime, now: datetime, limit: int = 1000) -> list[str]:
        """Mark online cells whose last heartbeat is at or before ``cutoff`` offline."""
        ids = [
            str(i)
            for i in await self.redis.zrangebyscore(
                LIVENESS, "-inf", cutoff.timestamp(), start=0, num=limit
            )
        ]
        records = dict(await self._hashes(CELL, ids=ids)) if ids else {}

        async def one(cell_id: str) -> Transition:
            raw = records[cell_id]
            return await self.transition(
                cell_id,
                lambda r: transitions.go_offline(r, cell_id, cutoff, now),
                assume=(raw, CellRecord.from_fields(raw)),
            )

        done = await asyncio.gather(*(one(i) for i in ids))
        return [i for i, t in zip(ids, done, strict=True) if t.outcome is Outcome.OFFLINE]

    async def audit(self, cell_id: str) -> list[AuditEntry]:
        """The cell's debug-access reports, in the order the cell made them."""
        lines = await self.redis.zrange(AUDIT + cell_id, 0, -1)
        return [AuditEntry.model_validate_json(str(line)) for line in lines]

    async def overdue_rotations(self, started_before: datetime) -> list[str]:
        ids = await self.redis.zrangebyscore(ROTATIONS, "-inf", started_before.timestamp())
        return [str(i) for i in ids]
