"""The infra_compliance service's Redis keys. It applies what ``model.py`` decides.

infra_compliance:fleet            hash: what it knows of each cell from events (common.fleet)
infra_compliance:templates        hash: version -> the published template (TemplateRecord JSON)
infra_compliance:newest           string: the newest published version
infra_compliance:cell:<id>        hash: the cell's compliance (model.Record)
infra_compliance:state:<state>    set: cell ids by compliance state
infra_compliance:timers           sorted set: "<cell>|<deadline>|<n>" -> when it is due
infra_compliance:timers-lease     string: the timer loop's lease (common.lease)
infra_compliance:outbox           list: events and commands not yet published (common.outbox)
infra_compliance:notify           list: SNS notices not yet published (timers.py)
infra_compliance:notify:inflight  list: the notice being published

Timers are fired only by the lease holder, each in one Change fenced on the lease and guarded
on the cell's record as read, which also removes the timer: a timer fires once, even across a
crash or a second replica.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from pydantic import BaseModel

from common.fleet import FleetView
from common.lease import Lease
from common.messages import Event, InfraRequired, Message
from common.outbox import Outbox, outbox_entry
from common.scripts import Change, Changes
from common.vocabulary import COMPLIANCE_STATES, ComplianceState
from services.infra_compliance.model import Record, Template, Timer

PREFIX = "infra_compliance:"
TEMPLATES = PREFIX + "templates"
NEWEST = PREFIX + "newest"
CELL = PREFIX + "cell:"
STATE = PREFIX + "state:"
TIMERS = PREFIX + "timers"
LEASE = PREFIX + "timers-lease"
OUTBOX = PREFIX + "outbox"
NOTIFY = PREFIX + "notify"
NOTIFY_INFLIGHT = NOTIFY + ":inflight"
# Fields of a record a write is guarded on: the ones a decision reads.
_GUARDED = ("state", "required_version", "deadline", "reminded")


class TemplateRecord(BaseModel):
    """A published template as stored."""

    version: int
    location: str
    published_at: datetime
    grace_seconds: float
    published_by: str

    def template(self) -> Template:
        return Template(
            self.version, self.location, self.published_at, timedelta(seconds=self.grace_seconds)
        )


class Notice(BaseModel):
    """An SNS message waiting to be published to an organisation's topic."""

    id: str
    org: str
    subject: str
    message: str


class Conflict(Exception):
    """What a decision read has changed; read again."""


def _epoch(when: datetime | None) -> str:
    return f"{when.timestamp():.6f}" if when else ""


def _time(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


def record_of(raw: dict[str, str]) -> Record:
    return Record(
        state=raw.get("state") or None,  # type: ignore[arg-type]  # written only here
        required_version=int(raw["required_version"]) if raw.get("required_version") else None,
        deadline=_time(raw.get("deadline")),
        location=raw.get("location") or None,
        seen_at=_time(raw.get("seen_at")),
        reminded=int(raw.get("reminded") or 0),
        reminders_sent=int(raw.get("reminders_sent") or 0),
    )


def _fields(r: Record) -> dict[str, object]:
    return {
        "state": r.state,
        "required_version": r.required_version,
        "deadline": _epoch(r.deadline),
        "location": r.location,
        "seen_at": _epoch(r.seen_at),
        "reminded": r.reminded,
        "reminders_sent": r.reminders_sent,
    }


def _timer_members(cell_id: str, deadline: datetime | None) -> list[str]:
    if deadline is None:
        return []
    return [Timer(cell_id, deadline, n, deadline).member for n in range(4)]


class InfraStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.fleet = FleetView(redis, PREFIX)
        self.outbox = Outbox(redis, OUTBOX)
        self._changes = Changes(redis)

    # -- templates ----------------------------------------------------------------------------

    async def templates(self) -> list[TemplateRecord]:
        raws = await self.redis.hvals(TEMPLATES)
        return sorted(
            (TemplateRecord.model_validate_json(r) for r in raws), key=lambda t: t.version
        )

    async def newest(self) -> int:
        return int(await self.redis.get(NEWEST) or 0)

    async def publish(self, template: TemplateRecord, newest: int, event: Event) -> bool:
        """Record a template if ``newest`` is still the newest version (False otherwise)."""
        change = (
            Change()
            .expecting_value(NEWEST, newest or None)
            .expecting(TEMPLATES, str(template.version), None)
            .run("HSET", TEMPLATES, template.version, template.model_dump_json())
            .run("SET", NEWEST, template.version)
            .push(OUTBOX, outbox_entry(event))
        )
        return (await self._changes.apply(change)).written

    # -- cells --------------------------------------------------------------------------------

    async def record(self, cell_id: str) -> dict[str, str]:
        raw: dict[str, str] = await self.redis.hgetall(CELL + cell_id)  # type: ignore[assignment]
        return raw

    async def records(self) -> dict[str, Record]:
        ids: list[str] = []
        for state in COMPLIANCE_STATES:
            ids += [str(i) for i in await self.redis.smembers(STATE + state)]
        ids.sort()
        pipe = self.redis.pipeline(transaction=False)
        for cell_id in ids:
            pipe.hgetall(CELL + cell_id)
        return {i: record_of(raw) for i, raw in zip(ids, await pipe.execute(), strict=True)}

    def _guarded(self, cell_id: str, raw: dict[str, str]) -> Change:
        change = Change().reading(CELL + cell_id)
        for name in _GUARDED:
            change.expecting(CELL + cell_id, name, raw.get(name, ""))
        return change

    def _write(self, change: Change, cell_id: str, was: Record, new: Record) -> None:
        change.hset(CELL + cell_id, _fields(new))
        if new.state is not None:
            change.move(STATE, cell_id, was.state, new.state)

    def _announce(self, change: Change, events: list[Event], command: InfraRequired | None) -> None:
        messages: list[Message] = [*events, *([command] if command else [])]
        for message in messages:
            change.push(OUTBOX, outbox_entry(message))

    async def save(
        self,
        cell_id: str,
        raw: dict[str, str],
        new: Record,
        *,
        timers: list[Timer],
        drop_timers: bool,
        events: list[Event],
        command: InfraRequired | None,
    ) -> None:
        """Write a reconciled record, if the record is still as read (Conflict otherwise)."""
        was = record_of(raw)
        change = self._guarded(cell_id, raw)
        self._write(change, cell_id, was, new)
        if drop_timers:
            for member in _timer_members(cell_id, was.deadline):
                change.run("ZREM", TIMERS, member)
        for timer in timers:
            change.run("ZADD", TIMERS, timer.due.timestamp(), timer.member)
        self._announce(change, events, command)
        if not (await self._changes.apply(change)).written:
            raise Conflict(cell_id)

    async def forget(self, cell_id: str, raw: dict[str, str]) -> None:
        """A decommissioned cell: its record and timers go."""
        was = record_of(raw)
        change = self._guarded(cell_id, raw).run("DEL", CELL + cell_id)
        if was.state is not None:
            change.run("SREM", STATE + was.state, cell_id)
        for member in _timer_members(cell_id, was.deadline):
            change.run("ZREM", TIMERS, member)
        if not (await self._changes.apply(change)).written:
            raise Conflict(cell_id)

    async def announce(self, message: Message) -> None:
        await self.outbox.put(message)

    # -- timers -------------------------------------------------------------------------------

    async def due(self, now: datetime, limit: int = 200) -> list[Timer]:
        found: list[tuple[str, float]] = await self.redis.zrangebyscore(  # type: ignore[assignment]
            TIMERS, "-inf", now.timestamp(), start=0, num=limit, withscores=True
        )
        return [Timer.parse(m, datetime.fromtimestamp(s, UTC)) for m, s in found]

    async def next_due(self) -> datetime | None:
        first = await self.redis.zrange(TIMERS, 0, 0, withscores=True)
        return datetime.fromtimestamp(float(first[0][1]), UTC) if first else None

    async def nearest_deadline(self) -> datetime | None:
        """The earliest deadline of a cell still pending."""
        pending = [str(i) for i in await self.redis.smembers(STATE + "pending")]
        if not pending:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for cell_id in pending:
            pipe.hget(CELL + cell_id, "deadline")
        deadlines = [d for d in await pipe.execute() if d]
        return datetime.fromtimestamp(min(float(d) for d in deadlines), UTC) if deadlines else None

    async def fire(
        self,
        lease: Lease,
        fence: str,
        timer: Timer,
        raw: dict[str, str],
        *,
        new: Record | None,
        events: list[Event],
        command: InfraRequired | None,
        notices: list[Notice],
    ) -> bool:
        """Write what a timer did and remove it, fenced on the lease; False if the record
        changed since it was read (the timer is still there, to be fired again)."""
        change = lease.fenced(self._guarded(timer.cell_id, raw), fence)
        change.run("ZREM", TIMERS, timer.member)
        if new is not None:
            self._write(change, timer.cell_id, record_of(raw), new)
        self._announce(change, events, command)
        for notice in notices:
            change.push(NOTIFY, notice.model_dump_json())
        return (await self._changes.apply(change)).written

    # -- notices to organisations ---------------------------------------------------------------

    async def next_notice(self) -> Notice | None:
        raw = await self.redis.lmove(NOTIFY, NOTIFY_INFLIGHT, "LEFT", "RIGHT")
        return Notice.model_validate_json(raw) if raw else None

    async def notice_sent(self, notice: Notice) -> None:
        await self.redis.lrem(NOTIFY_INFLIGHT, 1, notice.model_dump_json())

    async def notice_failed(self, notice: Notice) -> None:
        """Back to the head of the line, so order is kept."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrem(NOTIFY_INFLIGHT, 1, notice.model_dump_json())
        pipe.lpush(NOTIFY, notice.model_dump_json())
        await pipe.execute()

    async def recover_notices(self) -> None:
        """A holder that died mid-publish left its notice in flight: it goes first again (it
        may reach the topic twice; each carries its id for the subscriber to drop a repeat)."""
        while await self.redis.lmove(NOTIFY_INFLIGHT, NOTIFY, "RIGHT", "LEFT") is not None:
            pass

    async def counts(self) -> dict[ComplianceState, int]:
        pipe = self.redis.pipeline(transaction=False)
        for state in COMPLIANCE_STATES:
            pipe.scard(STATE + state)
        return dict(zip(COMPLIANCE_STATES, await pipe.execute(), strict=True))
