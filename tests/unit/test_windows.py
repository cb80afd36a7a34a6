"""Maintenance windows: the file's checks (time zone, overlaps, empty windows), when a window is
open across midnight, the week's end and a change of the clocks, and a rollout that updates a
cell only inside its window while its other cells go ahead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from common.windows import WindowSet
from services.rollout.model import RolloutPolicy, SoakTimes, abort, explain, plan, predict
from services.rollout.model.windows import Windows
from testing.rollout_fleet import NO_SOAK, T0, V1, V2, Fleet


def windows_(zone: str, *spans: tuple[list[str], str, int]) -> WindowSet:
    return WindowSet.model_validate({
        "time_zone": zone,
        "windows": [{"days": d, "start": s, "duration_minutes": m} for d, s, m in spans],
    })  # fmt: skip


@pytest.mark.parametrize(
    ("zone", "spans", "problem"),
    [
        ("Mars/Olympus", [(["mon"], "01:00", 60)], "time_zone"),
        ("UTC", [(["mon"], "01:00", 0)], "windows.0.duration_minutes"),
        ("UTC", [(["mon"], "01:00", 120), (["mon"], "02:00", 30)], "windows.1 overlaps windows.0"),
        ("UTC", [(["sun"], "23:00", 120), (["mon"], "00:30", 30)], "windows.1 overlaps windows.0"),
        ("UTC", [(["mon", "tue"], "01:00", 1500)], "windows.0 overlaps itself"),
        ("UTC", [(["someday"], "01:00", 10)], "windows.0.days.0"),
        ("UTC", [(["mon"], "25:00", 10)], "windows.0.start"),
    ],
)
def test_a_bad_set_of_windows_is_refused_naming_the_field(
    zone: str, spans: list[tuple[list[str], str, int]], problem: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        windows_(zone, *spans)
    assert problem in str(refused.value)


def test_open_and_next_open_across_midnight_the_week_s_end_and_the_clocks() -> None:
    sunday_night = windows_("UTC", (["sun"], "23:00", 120))
    monday = datetime(2026, 12, 7, 0, 30, tzinfo=UTC)  # inside: it began on Sunday
    assert sunday_night.is_open(monday)
    assert not sunday_night.is_open(monday + timedelta(hours=1))
    assert sunday_night.next_open(monday + timedelta(hours=1)) == datetime(
        2026, 12, 13, 23, 0, tzinfo=UTC
    )
    berlin = windows_("Europe/Berlin", (["sun"], "02:00", 60))
    # 29 March 2026: Berlin's clocks go from 02:00 to 03:00; the window's start is read as
    # the local time it names, whatever the offset.
    before = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    assert berlin.next_open(before) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 1, tzinfo=UTC)
    assert berlin.next_open(summer).hour == 0  # 02:00 in Berlin is 00:00 UTC in summer


def test_a_cell_outside_its_window_waits_while_one_inside_is_updated() -> None:
    fleet = Fleet(NO_SOAK)
    inside, outside = fleet.add(2, "staging")
    fleet.add(1, "saas")
    fleet.set(outside, org="acme")
    opens = T0 + timedelta(hours=3)  # T0 is a Sunday, 00:00 UTC
    fleet.windows = Windows(
        by_cell={inside: windows_("UTC", (["sun"], "00:00", 60))},
        by_org={"acme": windows_("UTC", (["sun"], "03:00", 60))},
        maintenance=frozenset({V2}),
    )
    fleet.publish(V2)
    fleet.run(seconds=600, step_seconds=60)
    assert fleet.installed(inside) == V2
    assert fleet.installed(outside) == V1
    r = fleet.r(V2)
    assert (r.state, r.stage) == ("in_progress", "staging"), "the stage waits for it"
    assert fleet.got(V2, "saas") == []
    reason, said, _ = explain(
        fleet.cells[outside], list(fleet.rollouts.values()), NO_SOAK, fleet.now, fleet.windows
    )
    assert reason == "waiting_for_window"
    assert f"waits for its window at {opens.isoformat()}" in said and "UTC" in said

    fleet.run(seconds=4 * 3600, step_seconds=600, max_ticks=100)
    sent = min(t for t, c, v in fleet.sent if c == outside and v == V2)
    assert opens <= sent < opens + timedelta(hours=1)
    assert fleet.r(V2).state == "completed"


def test_a_release_needing_no_maintenance_and_a_rollback_ignore_windows() -> None:
    fleet = Fleet(NO_SOAK)
    (cell,) = fleet.add(1, "staging")
    fleet.windows = Windows(
        by_cell={cell: windows_("UTC", (["wed"], "03:00", 60))}, maintenance=frozenset({V2})
    )
    fleet.publish("2026.11.1")  # needs none: not held
    fleet.run()
    assert fleet.r("2026.11.1").state == "completed"
    fleet.publish(V2)
    fleet.run(seconds=60)
    assert fleet.installed(cell) == "2026.11.1"
    # The policy's all_to_dedicated holds any release to a dedicated cell (not this one).
    assert not Windows(all_to_dedicated=True).needed(fleet.cells[cell], "2026.11.1")


def test_an_abort_sends_cells_back_outside_their_window() -> None:
    fleet = Fleet(RolloutPolicy(soak_seconds=SoakTimes(staging=3600, saas=0, dedicated=0)))
    (cell,) = fleet.add(1, "staging")
    fleet.add(1, "saas")
    fleet.publish(V2)
    fleet.run(max_ticks=3)
    assert fleet.installed(cell) == V2 and fleet.r(V2).state == "soaking"
    fleet.windows = Windows(
        by_cell={cell: windows_("UTC", (["wed"], "03:00", 60))}, maintenance=frozenset({V2, V1})
    )
    fleet.rollouts[V2] = abort(fleet.r(V2), fleet.now)
    fleet.run()
    assert fleet.installed(cell) == V1


def test_plan_predicts_each_cell_s_time_through_soaks_bakes_windows_and_approval() -> None:
    fleet = Fleet(NO_SOAK)
    (staging,) = fleet.add(1, "staging")
    (saas,) = fleet.add(1, "saas")
    dedicated = fleet.add(3, "dedicated")
    policy = RolloutPolicy(
        soak_seconds=SoakTimes(staging=600, saas=1200, dedicated=300),
        waves={"canary": 1, "fractions": [1.0]},
    )
    cells = list(fleet.cells.values())
    planned = plan(V2, cells, policy.waves)
    canary, rest = planned.stages["dedicated"]
    held = rest[0]
    fleet.set(held, org="acme")
    opens = T0 + timedelta(hours=3)
    windows = Windows(
        by_org={"acme": windows_("UTC", (["sun"], "03:00", 60))}, maintenance=frozenset({V2})
    )
    cells = list(fleet.cells.values())
    when, gated = predict(planned, cells, policy, windows, T0, bakes={"saas": 60})
    assert gated is None
    assert when[staging] == T0
    assert when[saas] == T0 + timedelta(seconds=600)
    assert when[canary[0]] == T0 + timedelta(seconds=600 + 60 + 1200)
    second = T0 + timedelta(seconds=600 + 60 + 1200 + 300)
    assert when[held] == max(second, opens)
    assert all(when[c] == second for c in rest if c != held)
    # A deferred cell gets it when its deferral ends, and holds no one.
    fleet.set(rest[1], deferred_until=T0 + timedelta(days=2))
    when, _ = predict(planned, list(fleet.cells.values()), policy, windows, T0, bakes={})
    assert when[rest[1]] == T0 + timedelta(days=2)
    # A stage waiting for approval: no time for it or after.
    two_person = policy.model_copy(update={"approval_stages": ["dedicated"]})
    when, gated = predict(planned, cells, two_person, windows, T0, bakes={})
    assert gated == "dedicated" and set(when) == {staging, saas}
    assert dedicated
