"""What holds a rollout at a stage's door, and what an operator does in an incident: approval by
a second operator (the two-person rule), a stage's scheduled start, skipping a soak, and
sending a failed cell its release again. Driven over the simulated fleet of
testing/rollout_fleet.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.rollout.model import (
    ActionRefused,
    Rollout,
    RolloutPolicy,
    SoakTimes,
    approve,
    explain,
    promote,
    retry,
    schedule,
)
from testing.rollout_fleet import NO_SOAK, V1, V2, Fleet, release, standard_fleet

TWO_PERSON = NO_SOAK.model_copy(update={"approval_stages": ["dedicated"]})


def _publish(fleet: Fleet, version: str, by: str) -> None:
    fleet.publish(version)
    fleet.rollouts[version] = fleet.r(version).model_copy(update={"published_by": by})


def test_a_release_waits_at_dedicated_for_a_second_operator_and_not_its_publisher() -> None:
    fleet = standard_fleet(TWO_PERSON, dedicated=4)
    _publish(fleet, V2, "op-bob")
    fleet.run()
    r = fleet.r(V2)
    assert (r.state, r.stage, r.waves) == ("in_progress", "dedicated", None)
    assert r.waiting is not None and "waits for approval to enter dedicated" in r.waiting
    assert "asked by op-bob" in r.waiting
    assert fleet.got(V2, "dedicated") == []
    assert fleet.got(V2, "saas") == fleet.of_stage("saas")
    cell = fleet.of_stage("dedicated")[0]
    reason, said, _ = explain(fleet.cells[cell], list(fleet.rollouts.values()), NO_SOAK, fleet.now)
    assert reason == "waiting_for_approval" and "op-bob" in said

    with pytest.raises(ActionRefused, match=r"op-bob published .* another operator"):
        approve(r, fleet.now, "op-bob")
    fleet.rollouts[V2] = approve(r, fleet.now, "op-carol")
    fleet.run()
    assert fleet.r(V2).state == "completed" and fleet.r(V2).waiting is None
    assert dict(fleet.r(V2).approved) == {"dedicated": "op-carol"}
    assert fleet.got(V2, "dedicated") == fleet.of_stage("dedicated")


def test_approval_ahead_lets_the_release_through_without_stopping() -> None:
    fleet = standard_fleet(TWO_PERSON, dedicated=3)
    _publish(fleet, V2, "op-bob")
    with pytest.raises(ActionRefused, match="waits for no approval now"):
        approve(fleet.r(V2), fleet.now, "op-carol")
    fleet.rollouts[V2] = approve(fleet.r(V2), fleet.now, "op-carol", "dedicated")
    fleet.run()
    assert fleet.r(V2).state == "completed"
    with pytest.raises(ActionRefused, match="completed"):
        approve(fleet.r(V2), fleet.now, "op-carol", "dedicated")


def test_a_stage_without_cells_needs_no_approval() -> None:
    fleet = standard_fleet(TWO_PERSON, dedicated=0)
    _publish(fleet, V2, "op-bob")
    fleet.run()
    assert fleet.r(V2).state == "completed"


def test_a_scheduled_stage_starts_at_its_time_and_not_before() -> None:
    fleet = standard_fleet(NO_SOAK, dedicated=2)
    fleet.rollouts[V2] = fleet.rollouts.get(V2) or _new(fleet, V2)
    start = fleet.now + timedelta(seconds=30)
    fleet.rollouts[V2] = schedule(fleet.r(V2), fleet.now, "saas", start)
    fleet.run(seconds=10)
    r = fleet.r(V2)
    assert r.stage == "saas" and r.waves is None and "saas starts at" in (r.waiting or "")
    assert fleet.got(V2, "saas") == []
    cell = fleet.of_stage("saas")[0]
    reason, said, _ = explain(fleet.cells[cell], list(fleet.rollouts.values()), NO_SOAK, fleet.now)
    assert reason == "scheduled" and "saas starts at" in said
    fleet.run(seconds=30)
    assert fleet.r(V2).state == "completed"
    first_saas = min(t for t, c, v in fleet.sent if v == V2 and fleet.cells[c].stage == "saas")
    assert first_saas >= start
    with pytest.raises(ActionRefused, match="in the past"):
        schedule(_new(fleet, "2026.11.9"), fleet.now, "saas", fleet.now - timedelta(seconds=1))
    later = _new(fleet, "2026.11.9")
    fleet.run()
    with pytest.raises(ActionRefused, match="is completed"):
        schedule(fleet.r(V2), fleet.now, "dedicated", fleet.now + timedelta(hours=1))
    paused = later.model_copy(update={"state": "paused", "stage": "saas", "waves": ()})
    with pytest.raises(ActionRefused, match="already started staging"):
        schedule(paused, fleet.now, "staging", fleet.now + timedelta(hours=1))


def _new(fleet: Fleet, version: str) -> Rollout:
    fleet.publish(version)
    return fleet.r(version)


def test_promote_skips_the_rest_of_a_soak() -> None:
    policy = RolloutPolicy(soak_seconds=SoakTimes(staging=3600, saas=0, dedicated=0))
    fleet = standard_fleet(policy, dedicated=2)
    fleet.publish(V2)
    fleet.run(max_ticks=5)
    assert fleet.r(V2).state == "soaking"
    fleet.rollouts[V2] = promote(fleet.r(V2), fleet.now)
    fleet.run(max_ticks=20)
    assert fleet.r(V2).state == "completed"
    with pytest.raises(ActionRefused, match="only a soaking one"):
        promote(fleet.r(V2), fleet.now)


def test_retry_sends_failed_cells_their_release_again_and_the_rollout_carries_on() -> None:
    fleet = standard_fleet(NO_SOAK, dedicated=2)
    broken = {"sta-000"}
    fleet.outcome = lambda cell, v: "failed" if cell.id in broken else "succeeded"
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "halted"
    assert fleet.installed("sta-000") == V1
    sent_before = sum(1 for _, c, v in fleet.sent if c == "sta-000" and v == V2)
    broken.clear()  # the cause is fixed (an image pushed again, say)
    fleet.rollouts[V2] = retry(fleet.r(V2), fleet.now)
    fleet.run()
    assert fleet.r(V2).state == "completed"
    assert sum(1 for _, c, v in fleet.sent if c == "sta-000" and v == V2) == sent_before + 1
    assert fleet.installed("sta-000") == V2
    with pytest.raises(ActionRefused, match="retry_failed_seconds"):
        retry(fleet.r(V2), fleet.now)


def test_the_publisher_is_kept_and_an_old_rollout_without_one_can_be_approved() -> None:
    fleet = standard_fleet(TWO_PERSON, dedicated=1)
    fleet.rollouts[V2] = _new(fleet, V2)  # published_by unknown: any operator approves
    fleet.run()
    assert "its publisher" in (fleet.r(V2).waiting or "")
    fleet.rollouts[V2] = approve(fleet.r(V2), fleet.now, "op-bob")
    fleet.run()
    assert fleet.r(V2).state == "completed"
    assert release(V2).version == V2
