"""Infrastructure compliance, pure: durations, what a cell must apply and by when, reminders
scaled to the grace, and what each timer does (once)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from common.messages import InfraComplianceChanged, InfraReminder
from services.infra_compliance import model
from services.infra_compliance.model import Record, Template, Timer

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def template(version: int, published: datetime = T0, grace: timedelta = 14 * DAY) -> Template:
    return Template(version, f"s3://b/templates/{version}/x.yaml", published, grace)


@pytest.mark.parametrize(
    ("text", "seconds"), [("14d", 14 * 86400), ("36h", 36 * 3600), ("90s", 90), ("15m", 900),
                          (" 1.5h ", 5400)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert model.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "14", "d", "14days", "-1d", "0s", "1w", "1e3s"])
def test_durations_that_do_not_parse_say_so(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        model.parse_duration(text)


def test_a_cell_on_an_older_version_must_apply_the_newest_by_the_earliest_deadline() -> None:
    published = [template(2, T0, 14 * DAY), template(3, T0 + 5 * DAY, 14 * DAY)]
    req = model.requirement(published, "1", seen_at=T0)
    assert req is not None and req.version == 3, "the newest is what it applies"
    assert req.deadline == T0 + 14 * DAY, "v2's deadline comes first"
    assert model.requirement(published, "3", T0) is None
    assert model.requirement(published, None, T0) is not None, "no version counts as oldest"
    assert model.requirement([], "1", T0) is None


def test_a_version_never_published_counts_as_none() -> None:
    """A cell reporting a template newer than any published was compliant for ever."""
    published = [template(2, T0, 14 * DAY), template(3, T0 + 5 * DAY, 14 * DAY)]
    for claimed in ("99", "4", "-5", "x"):
        req = model.requirement(published, claimed, seen_at=T0)
        assert req is not None and req.version == 3, claimed


def test_a_cell_seen_later_gets_the_whole_grace_from_then() -> None:
    req = model.requirement([template(2)], "1", seen_at=T0 + 20 * DAY)
    assert req is not None and req.deadline == T0 + 34 * DAY


def test_reminders_are_at_7_3_and_1_days_left_scaled_to_the_grace() -> None:
    default = model.requirement([template(2)], "1", T0)
    assert default is not None
    assert [default.deadline - r for r in default.reminders()] == [7 * DAY, 3 * DAY, DAY]
    short = model.requirement([template(2, grace=timedelta(seconds=14))], "1", T0)
    assert short is not None
    assert [(short.deadline - r).total_seconds() for r in short.reminders()] == [7, 3, 1]


def test_a_new_requirement_sets_its_timers_announces_pending_and_tells_the_cell() -> None:
    plan = model.reconcile(Record(), "acme", "1", [template(2)], T0)
    assert plan.changed and plan.record.state == "pending" and plan.record.required_version == 2
    assert [t.n for t in plan.timers] == [1, 2, 3, 0]
    assert plan.timers[-1].due == T0 + 14 * DAY
    assert [type(e) for e in plan.events] == [InfraComplianceChanged]
    assert plan.command is not None and plan.command.required_version == "2"
    again = model.reconcile(plan.record, "acme", "1", [template(2)], T0 + DAY)
    assert not again.changed, "nothing new: no second set of timers"


def test_the_required_version_reported_makes_the_cell_compliant_again() -> None:
    pending = model.reconcile(Record(), "acme", "1", [template(2)], T0).record
    late = Record(state="out_of_sla", required_version=2, deadline=pending.deadline,
                  location=pending.location, seen_at=T0, reminded=3, reminders_sent=3)  # fmt: skip
    plan = model.reconcile(late, "acme", "2", [template(2)], T0 + 20 * DAY)
    assert plan.record.state == "compliant" and plan.drop_timers and not plan.timers
    (event,) = plan.events
    assert isinstance(event, InfraComplianceChanged) and event.status == "compliant"
    assert plan.command is not None and plan.command.status == "compliant"
    assert plan.record.reminders_sent == 3, "the total is kept"


def test_each_reminder_fires_once_and_the_deadline_puts_the_cell_out_of_sla() -> None:
    record = model.reconcile(Record(), "acme", "1", [template(2)], T0).record
    deadline = record.deadline
    assert deadline is not None
    first = Timer("acme", deadline, 1, deadline - 7 * DAY)
    new, events, command = model.fire(record, first, "acme-org", "1", T0 + 7 * DAY)
    assert new is not None and new.reminded == 1 and new.reminders_sent == 1 and command is None
    (reminder,) = events
    assert isinstance(reminder, InfraReminder) and (reminder.reminder, reminder.of) == (1, 3)
    assert reminder.org == "acme-org" and reminder.location == record.location
    assert model.fire(new, first, "acme-org", "1", T0 + 7 * DAY) == (None, [], None)

    third = Timer("acme", deadline, 3, deadline - DAY)
    after_third, _, _ = model.fire(new, third, "o", "1", T0 + 13 * DAY)
    assert after_third is not None and after_third.reminded == 3
    second = Timer("acme", deadline, 2, deadline - 3 * DAY)
    assert model.fire(after_third, second, "o", "1", T0 + 13 * DAY) == (None, [], None)

    due = Timer("acme", deadline, 0, deadline)
    out, events, command = model.fire(after_third, due, "o", "1", deadline)
    assert out is not None and out.state == "out_of_sla"
    (changed,) = events
    assert isinstance(changed, InfraComplianceChanged) and changed.status == "out_of_sla"
    assert command is not None and command.status == "out_of_sla"
    assert model.fire(out, due, "o", "1", deadline) == (None, [], None), "fires once"


def test_a_timer_of_an_older_deadline_does_nothing() -> None:
    record = model.reconcile(Record(), "acme", "1", [template(2)], T0).record
    stale = Timer("acme", T0 + DAY, 0, T0 + DAY)
    assert model.fire(record, stale, "o", "1", T0 + DAY) == (None, [], None)


def test_timers_name_themselves_for_redis_and_back() -> None:
    timer = Timer("acme-prod", T0 + DAY, 2, T0)
    assert Timer.parse(timer.member, T0) == timer
