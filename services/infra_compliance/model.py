"""Infrastructure compliance, pure: what a published template requires of each cell, by when,
when to remind its customer, and what each timer does when it fires.

A template version, once published, must be applied by every cell on an older version within
its grace period (default 14 days): counted from the publication, or from the time the cell was
first seen on an older version if that is later. A cell's deadline is the earliest of those of
the versions newer than the one it runs; what it is asked to apply is the newest. Before the
deadline its customer is reminded (by default at 7, 3 and 1 days left, scaled to the grace);
at the deadline a cell still on an older version is out of SLA and gets no application update
until it reports the required version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import yaml

from common.messages import Event, InfraComplianceChanged, InfraReminder, InfraRequired
from common.vocabulary import ComplianceState

DEFAULT_GRACE = timedelta(days=14)
# Reminders, as days left of the default 14-day grace; a shorter or longer grace scales them.
REMINDER_DAYS = (7, 3, 1)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms])\s*$")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


def parse_duration(text: str) -> timedelta:
    """``14d``, ``36h``, ``15m``, ``90s``; ValueError naming what is wrong."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 14d, 36h, 15m or 90s")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return timedelta(seconds=seconds)


def version_number(text: str | None) -> int | None:
    """Template versions are whole numbers (the stack's ``TemplateVersion`` output); anything
    else (no stack, a hand-edited template) counts as older than every version."""
    return int(text) if text and _VERSION.match(text) else None


def version_problem(text: str) -> str | None:
    if not _VERSION.match(text):
        return (
            f"{text!r} is not a template version (a whole number from 1, like the stack's "
            "TemplateVersion output)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Template:
    version: int
    location: str
    published_at: datetime
    grace: timedelta


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a cell must apply, and by when."""

    version: int
    location: str
    deadline: datetime
    grace: timedelta

    def reminders(self) -> list[datetime]:
        """When the customer is reminded, earliest first (days left scaled to the grace)."""
        scale = self.grace / DEFAULT_GRACE
        return [self.deadline - timedelta(days=d) * scale for d in REMINDER_DAYS]


class _TemplateLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub, ...) as plain values."""


_TemplateLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def template_version_of(text: str) -> str | None:
    """The ``TemplateVersion`` output a template declares (what a stack made from it reports),
    or None where it declares none or does not parse."""
    try:
        parsed = yaml.load(text, Loader=_TemplateLoader)
    except yaml.YAMLError:
        return None
    output = parsed.get("Outputs", {}).get("TemplateVersion") if isinstance(parsed, dict) else None
    value = output.get("Value") if isinstance(output, dict) else None
    return str(value) if isinstance(value, (str, int)) else None


def is_published(templates: list[Template], cell_version: str | None) -> bool:
    """Whether ``cell_version`` is none, or one of the published (with none published, any
    is as good as none)."""
    if cell_version is None or not templates:
        return True
    return version_number(cell_version) in {t.version for t in templates}


def requirement(
    templates: list[Template], cell_version: str | None, seen_at: datetime
) -> Requirement | None:
    """What a cell on ``cell_version`` (first seen on it at ``seen_at``) must apply; None when
    it runs the newest published version (or no version was published). A version never
    published counts as none: a cell reporting a template newer than any (``99``) would
    otherwise be compliant for ever without applying one."""
    runs = version_number(cell_version) or 0
    if not is_published(templates, cell_version):
        runs = 0
    newer = [t for t in templates if t.version > runs]
    if not newer:
        return None
    newest = max(newer, key=lambda t: t.version)
    due = min(newer, key=lambda t: max(t.published_at, seen_at) + t.grace)
    deadline = max(due.published_at, seen_at) + due.grace
    return Requirement(newest.version, newest.location, deadline, due.grace)


def state_of(req: Requirement | None, now: datetime) -> ComplianceState:
    if req is None:
        return "compliant"
    return "out_of_sla" if now >= req.deadline else "pending"


# -- a cell's compliance record -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """What the service keeps of a cell's compliance (None: nothing recorded yet)."""

    state: ComplianceState | None = None
    required_version: int | None = None
    deadline: datetime | None = None
    location: str | None = None
    seen_at: datetime | None = None
    # Reminders sent for the current deadline, and in all.
    reminded: int = 0
    reminders_sent: int = 0


@dataclass(frozen=True)
class Timer:
    """Something due at ``due`` for one cell: reminder ``n`` (1-based), or the deadline (n=0).
    Timers of an older deadline are stale when they fire and do nothing."""

    cell_id: str
    deadline: datetime
    n: int
    due: datetime

    @property
    def member(self) -> str:
        return f"{self.cell_id}|{self.deadline.timestamp():.6f}|{self.n}"

    @classmethod
    def parse(cls, member: str, due: datetime) -> Timer:
        cell_id, deadline, n = member.rsplit("|", 2)
        return cls(cell_id, datetime.fromtimestamp(float(deadline), due.tzinfo), int(n), due)


@dataclass
class Plan:
    """What to write for one cell: its record's new fields, timers to set and to drop, events
    to announce and the command that tells the cell."""

    record: Record
    changed: bool = False
    timers: list[Timer] = field(default_factory=list)
    drop_timers: bool = False
    events: list[Event] = field(default_factory=list)
    command: InfraRequired | None = None


def _changed_event(
    cell_id: str, state: ComplianceState, runs: str | None, req: Requirement | None, now: datetime
) -> InfraComplianceChanged:
    return InfraComplianceChanged(
        at=now,
        cell_id=cell_id,
        status=state,
        template_version=runs,
        required_version=str(req.version) if req else None,
        deadline=req.deadline if req else None,
    )


def required_now(cell_id: str, record: Record, now: datetime) -> InfraRequired | None:
    """What the cell is told again (it may have lost it: a new state directory), or None when
    nothing was decided for it yet."""
    if record.state is None:
        return None
    req = None
    if record.required_version is not None and record.location and record.deadline:
        req = Requirement(record.required_version, record.location, record.deadline, timedelta(0))
    return _required(cell_id, record.state, req, now)


def _required(
    cell_id: str, state: ComplianceState, req: Requirement | None, now: datetime
) -> InfraRequired:
    return InfraRequired(
        cell_id=cell_id,
        issued_at=now,
        status=state,
        required_version=str(req.version) if req else None,
        location=req.location if req else None,
        deadline=req.deadline if req else None,
    )


def reconcile(
    record: Record,
    cell_id: str,
    runs: str | None,
    templates: list[Template],
    now: datetime,
) -> Plan:
    """Bring a cell's compliance up to date with what it runs and what is published: a new
    requirement sets a deadline and its timers and tells the cell; the required version
    reported makes the cell compliant again. A passed deadline is the timers' business."""
    seen_at = record.seen_at or now
    req = requirement(templates, runs, seen_at)
    if req is None:
        if record.state in (None, "compliant") and record.required_version is None:
            return Plan(record)
        new = Record(state="compliant", seen_at=None, reminders_sent=record.reminders_sent)
        plan = Plan(new, changed=True, drop_timers=True)
        if record.state != "compliant":
            plan.events.append(_changed_event(cell_id, "compliant", runs, None, now))
        plan.command = _required(cell_id, "compliant", None, now)
        return plan
    if record.required_version == req.version and record.deadline == req.deadline:
        return Plan(record)
    # A cell that applied a newer version but not the newest is judged by the newest's deadline.
    state = state_of(req, now)
    new = Record(
        state=state,
        required_version=req.version,
        deadline=req.deadline,
        location=req.location,
        seen_at=seen_at,
        reminded=0,
        reminders_sent=record.reminders_sent,
    )
    plan = Plan(new, changed=True, drop_timers=True)
    if state == "pending":
        plan.timers = [
            Timer(cell_id, req.deadline, n, due)
            for n, due in enumerate(req.reminders(), 1)
            if due > now
        ]
        plan.timers.append(Timer(cell_id, req.deadline, 0, req.deadline))
    if state != record.state:
        plan.events.append(_changed_event(cell_id, state, runs, req, now))
    plan.command = _required(cell_id, state, req, now)
    return plan


def fire(
    record: Record, timer: Timer, org: str, runs: str | None, now: datetime
) -> tuple[Record | None, list[Event], InfraRequired | None]:
    """What a due timer does: a reminder is sent once (and an earlier one that is still due
    is skipped, a later one has been sent); the deadline puts a cell that is still pending out
    of SLA. A timer of another deadline than the record's is stale: nothing (None)."""
    if record.deadline != timer.deadline or record.state != "pending":
        return None, [], None
    assert record.required_version is not None and record.location is not None
    req = Requirement(record.required_version, record.location, timer.deadline, timedelta(0))
    if timer.n == 0:
        new = Record(
            state="out_of_sla",
            required_version=record.required_version,
            deadline=record.deadline,
            location=record.location,
            seen_at=record.seen_at,
            reminded=record.reminded,
            reminders_sent=record.reminders_sent,
        )
        event = _changed_event(timer.cell_id, "out_of_sla", runs, req, now)
        return new, [event], _required(timer.cell_id, "out_of_sla", req, now)
    if timer.n <= record.reminded:
        return None, [], None
    reminder = InfraReminder(
        at=now,
        cell_id=timer.cell_id,
        org=org,
        required_version=str(req.version),
        deadline=timer.deadline,
        location=req.location,
        reminder=timer.n,
        of=len(REMINDER_DAYS),
    )
    new = Record(
        state=record.state,
        required_version=record.required_version,
        deadline=record.deadline,
        location=record.location,
        seen_at=record.seen_at,
        reminded=timer.n,
        reminders_sent=record.reminders_sent + 1,
    )
    return new, [reminder], None
