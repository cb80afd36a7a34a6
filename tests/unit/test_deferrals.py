"""A customer's deferral: decided against the vendor's budget, and what it holds: the waves go
on without a deferred cell, which catches up when the deferral ends, and a release past its
deadline (a security release's) goes through it."""

from __future__ import annotations

from datetime import timedelta

from common.messages import CellSync
from common.releases import Release
from services.rollout.deferrals import decide
from services.rollout.model import RolloutPolicy, explain, new_rollout
from services.rollout.model.windows import Windows
from testing.rollout_fleet import NO_SOAK, T0, V1, V2, Fleet, release

POLICY = RolloutPolicy(max_deferral_days=7)


def _asked(**fields: object) -> CellSync:
    return CellSync.model_validate({
        "cell_id": "ded-000", "seq": 1, "sent_at": T0, "reason": "defer", "defer_id": "r1",
        **fields,
    })  # fmt: skip


def test_a_deferral_within_the_budget_is_accepted_and_one_past_it_refused_saying_why() -> None:
    ok = decide(_asked(defer_until=T0 + timedelta(days=3)), POLICY, [], T0)
    assert ok.accepted and ok.until == T0 + timedelta(days=3)
    too_long = decide(_asked(defer_until=T0 + timedelta(days=8)), POLICY, [], T0)
    assert not too_long.accepted
    assert "past the vendor's budget of 7 days" in too_long.reason
    past = decide(_asked(defer_until=T0 - timedelta(hours=1)), POLICY, [], T0)
    assert not past.accepted and "is in the past" in past.reason
    assert decide(_asked(defer_cancel=True), POLICY, [], T0).until is None
    # A release with a deadline before the end of the deferral goes through it: said at once.
    security = Release.model_validate({**release(V2).model_dump(), "security": True})
    rollout = new_rollout(security, T0, security_deadline=timedelta(days=1))
    noted = decide(_asked(defer_until=T0 + timedelta(days=3)), POLICY, [rollout], T0)
    assert noted.accepted and f"{V2} is applied from" in noted.reason


def test_the_waves_go_on_without_a_deferred_cell_and_it_catches_up_when_it_ends() -> None:
    fleet = Fleet(NO_SOAK)
    fleet.add(1, "staging")
    deferred, other = fleet.add(2, "dedicated")
    until = T0 + timedelta(hours=2)
    fleet.set(deferred, deferred_until=until, deferral_reason="quarter end")
    fleet.windows = Windows()
    fleet.publish(V2)
    fleet.run(seconds=600, step_seconds=60)
    assert fleet.r(V2).state == "completed"
    assert fleet.installed(other) == V2 and fleet.installed(deferred) == V1
    reason, said, _ = explain(
        fleet.cells[deferred], list(fleet.rollouts.values()), NO_SOAK, fleet.now, fleet.windows
    )
    assert reason == "deferred" and "quarter end" in said and until.isoformat() in said
    fleet.run(seconds=3 * 3600, step_seconds=600, max_ticks=50)
    assert fleet.installed(deferred) == V2
    assert min(t for t, c, v in fleet.sent if c == deferred and v == V2) >= until


def test_a_security_release_goes_through_a_deferral_once_its_deadline_passed() -> None:
    fleet = Fleet(NO_SOAK)
    fleet.add(1, "staging")
    (deferred,) = fleet.add(1, "dedicated")
    fleet.set(deferred, deferred_until=T0 + timedelta(days=5))
    security = Release.model_validate({**release(V2).model_dump(), "security": True})
    fleet.rollouts[V2] = new_rollout(security, T0, security_deadline=timedelta(hours=1))
    fleet.windows = Windows(deadlines={V2: T0 + timedelta(hours=1)})
    fleet.run(seconds=1800, step_seconds=300, max_ticks=20)
    assert fleet.installed(deferred) == V1
    fleet.run(seconds=3600, step_seconds=300, max_ticks=40)
    assert fleet.installed(deferred) == V2
