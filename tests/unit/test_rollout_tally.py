"""The counts a controller keeps as cells change (model.tally) are the counts computed over the
whole fleet (stage_counts), at every moment of rollouts with failures, silent cells that time
out, offline cells, deferrals, supersession and a policy change."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rollout.model import CellFacts, RolloutPolicy, stage_counts
from services.rollout.model.tally import Tally
from testing.rollout_fleet import V1, V2, V3, Fleet

STAGES = ("staging", "saas", "dedicated")


def follow(
    tally: Tally, before: dict[str, CellFacts], after: dict[str, CellFacts], now: datetime
) -> None:
    """Tell the tally what changed, as the controller does: each cell's old and new entry."""
    for cell_id in before.keys() | after.keys():
        old, new = before.get(cell_id), after.get(cell_id)
        if old != new:
            tally.update(old, new, now)


def assert_same(tally: Tally, fleet: Fleet) -> None:
    cells = list(fleet.cells.values())
    for version, r in fleet.rollouts.items():
        assert tally.counts[version] == stage_counts(r, cells, fleet.policy, fleet.now), version
    deferred = {c.id: (c.deferred_until, c.installed_release) for c in cells if c.deferred_until}
    assert tally.deferred == deferred


@settings(max_examples=40, deadline=None)
@given(
    stages=st.lists(st.sampled_from(STAGES), min_size=3, max_size=30),
    fates=st.lists(st.sampled_from(["succeeded", "failed", "silent"]), min_size=30, max_size=30),
    offline=st.sets(st.integers(0, 29), max_size=6),
    deferred=st.sets(st.integers(0, 29), max_size=4),
    gone=st.sets(st.integers(0, 29), max_size=3),
    deadline=st.sampled_from([5.0, 30.0]),
)
def test_counts_kept_as_cells_change_are_the_counts_over_the_fleet(
    stages: list[str],
    fates: list[str],
    offline: set[int],
    deferred: set[int],
    gone: set[int],
    deadline: float,
) -> None:
    policy = RolloutPolicy.model_validate({
        "soak_seconds": {"staging": 0, "saas": 0, "dedicated": 0},
        "progress_deadline_seconds": deadline, "failure_threshold": 3,
    })  # fmt: skip
    fleet = Fleet(policy)
    for i, stage in enumerate(stages):
        fleet.add(1, stage, prefix=f"c{i:02d}")
    ids = sorted(fleet.cells)
    fleet.outcome = lambda cell, v: fates[ids.index(cell.id)]
    fleet.publish(V2)
    tally = Tally(policy)
    tally.reset(fleet.cells.values(), fleet.rollouts, fleet.now)
    assert_same(tally, fleet)

    for tick in range(40):
        before = dict(fleet.cells)
        if tick == 3:
            for i in offline & set(range(len(ids))):
                fleet.set(ids[i], status="offline")
            for i in deferred & set(range(len(ids))):
                fleet.set(ids[i], deferred_until=fleet.now + timedelta(seconds=20))
        if tick == 6:
            fleet.publish(V3)
        if tick == 9:
            for i in gone & set(range(len(ids))):
                fleet.set(ids[i], status="decommissioned")
        if tick == 12:
            for i in offline & set(range(len(ids))):
                fleet.set(ids[i], status="online")
        fleet.tick()
        fleet.agents()
        fleet.now += timedelta(seconds=2)
        for version in fleet.rollouts.keys() - tally.counts.keys():
            tally.add_release(version, before.values(), fleet.now)
        follow(tally, before, fleet.cells, fleet.now)
        tally.advance(fleet.cells, fleet.now)
        assert_same(tally, fleet)


def test_a_silent_cell_turns_timed_out_when_its_deadline_passes_without_any_change() -> None:
    policy = RolloutPolicy.model_validate({"progress_deadline_seconds": 10})
    fleet = Fleet(policy)
    [cell_id] = fleet.add(1, "staging", installed=V1)
    fleet.publish(V2)
    sent = replace(fleet.cells[cell_id], desired_version=V2, desired_generation=1,
                   desired_at=fleet.now)  # fmt: skip
    tally = Tally(policy)
    tally.reset([fleet.cells[cell_id]], [V2], fleet.now)
    tally.update(fleet.cells[cell_id], sent, fleet.now)
    fleet.cells[cell_id] = sent
    assert tally.counts[V2]["staging"]["in_progress"] == 1

    tally.advance(fleet.cells, fleet.now + timedelta(seconds=9))
    assert tally.counts[V2]["staging"]["in_progress"] == 1
    tally.advance(fleet.cells, fleet.now + timedelta(seconds=11))
    assert tally.counts[V2]["staging"] == {**tally.counts[V2]["staging"], "in_progress": 0,
                                           "failed": 1, "total": 1}  # fmt: skip
    # Its late report takes it out of "failed" exactly once.
    reported = replace(sent, report_generation=1, report_phase="succeeded", installed_release=V2)
    tally.update(sent, reported, fleet.now + timedelta(seconds=12))
    assert tally.counts[V2]["staging"]["failed"] == 0
    assert tally.counts[V2]["staging"]["updated"] == 1
    assert tally.take_changed() == ({V2}, False)
    assert tally.take_changed() == (set(), False)
