"""The rollout controller's decisions (model.step, catch_up, superseded, explain), driven over
a simulated fleet: the simulator plays the controller's loop and the cells' agents, and every
test asserts what reached which cell, in which order."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.messages import RolloutCompleted, RolloutHalted, RolloutProgressed
from services.rollout.model import (
    STAGE_ORDER,
    ActionRefused,
    CellFacts,
    ReleaseFile,
    RolloutPolicy,
    SoakTimes,
    StagePolicies,
    abort,
    catch_up,
    explain,
    new_rollout,
    newer,
    pause,
    resume,
    stage_counts,
    step,
    superseded,
)
from testing.rollout_fleet import (
    NO_SOAK,
    T0,
    V1,
    V2,
    V3,
    Fleet,
    release,
    standard_fleet,
)

# -- the happy path -------------------------------------------------------------------------------


def test_a_release_goes_staging_then_saas_then_dedicated_in_waves_and_completes() -> None:
    fleet = standard_fleet()
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "completed"
    assert all(fleet.installed(c) == V2 for c in fleet.cells)
    first = {c: min(t for t, cc, v in fleet.sent if cc == c and v == V2) for c in fleet.cells}
    by_stage = {
        s: [first[c] for c in fleet.cells if fleet.cells[c].stage == s] for s in STAGE_ORDER
    }
    assert max(by_stage["staging"]) < min(by_stage["saas"]) < min(by_stage["dedicated"])
    # Dedicated: a canary, then 10%, 50%, 100% of the other 19: 1, 2, 8, 9 cells.
    dedicated_times = sorted(by_stage["dedicated"])
    sizes = [dedicated_times.count(t) for t in sorted(set(dedicated_times))]
    assert sizes == [1, 2, 8, 9]
    assert sum(isinstance(e, RolloutCompleted) for e in fleet.events) == 1
    # Done, it keeps how many waves its last stage had, not the cells in them.
    assert fleet.r(V2).waves == ((), (), (), ()) and fleet.r(V2).wave == 3


def test_each_stage_soaks_for_its_time_before_the_next_starts() -> None:
    policy = RolloutPolicy(soak_seconds=SoakTimes(staging=600, saas=1200, dedicated=300))
    fleet = standard_fleet(policy, dedicated=3)
    fleet.publish(V2)
    fleet.run(step_seconds=10, max_ticks=1000)
    assert fleet.r(V2).state == "completed"
    first: dict[str, list[datetime]] = {}
    for t, c, _ in fleet.sent:
        first.setdefault(fleet.cells[c].stage, []).append(t)
    staging_done = max(first["staging"])
    assert min(first["saas"]) - staging_done >= timedelta(seconds=600)
    assert min(first["dedicated"]) - min(first["saas"]) >= timedelta(seconds=1200)
    dedicated = sorted(set(first["dedicated"]))
    assert all(b - a >= timedelta(seconds=300) for a, b in pairwise(dedicated))
    states = [e.state for e in fleet.events if isinstance(e, RolloutProgressed)]
    assert "soaking" in states and states[-1] == "completed"


def test_a_step_written_and_taken_again_changes_nothing() -> None:
    """Restart safety: the controller keeps nothing in memory, so a step taken again from what
    was written decides nothing new."""
    fleet = standard_fleet()
    fleet.publish(V2)
    for _ in range(6):
        fleet.tick()
        r, cells = fleet.r(V2), list(fleet.cells.values())
        again = step(r, cells, fleet.policy, fleet.now)
        assert again.rollout == r and not again.assign and not again.events
        assert catch_up(cells, list(fleet.rollouts.values())) == []
        fleet.agents()
        fleet.now += timedelta(seconds=1)


def test_a_step_says_how_many_outcomes_its_wave_waits_for() -> None:
    """The controller steps again once that many outcomes came in (controller.py)."""
    fleet = standard_fleet()
    fleet.publish(V2)
    first = step(fleet.r(V2), list(fleet.cells.values()), fleet.policy, fleet.now)
    assert len(first.assign) == 2 and first.awaiting == 2  # staging's two cells, just sent
    fleet.rollouts[V2] = first.rollout
    fleet._assign(first.assign)
    staging = sorted(a.cell_id for a in first.assign)
    fleet.set(staging[0], installed_release=V2)
    again = step(fleet.r(V2), list(fleet.cells.values()), fleet.policy, fleet.now)
    assert again.awaiting == 1 and not again.assign
    fleet.set(staging[1], installed_release=V2)
    # The wave done, the step moves on through saas to dedicated's canary, and waits for it.
    on = step(fleet.r(V2), list(fleet.cells.values()), fleet.policy, fleet.now)
    assert on.rollout.stage == "saas" and on.awaiting == 1
    fleet.rollouts[V2] = on.rollout
    fleet._assign(on.assign)
    fleet.run()
    done = step(fleet.r(V2), list(fleet.cells.values()), fleet.policy, fleet.now)
    assert fleet.r(V2).state == "completed" and done.awaiting == 0


# -- failures, halts, resume and abort ------------------------------------------------------------


def test_a_release_failing_in_staging_halts_there_and_reaches_no_later_stage() -> None:
    fleet = standard_fleet()
    fleet.outcome = lambda cell, v: "failed" if v == V2 else "succeeded"
    fleet.publish(V2)
    fleet.run()
    r = fleet.r(V2)
    assert (r.state, r.stage) == ("halted", "staging")
    assert fleet.got(V2, "saas") == [] and fleet.got(V2, "dedicated") == []
    halts = [e for e in fleet.events if isinstance(e, RolloutHalted)]
    assert len(halts) == 1 and {f.cell_id for f in halts[0].failures} == set(fleet.got(V2))
    assert all(f.error == "health check failed" for f in halts[0].failures)


def test_a_release_failing_on_dedicated_halts_after_the_canary_alone() -> None:
    fleet = standard_fleet()
    fleet.outcome = lambda cell, v: (
        "failed" if cell.stage == "dedicated" and v == V2 else "succeeded"
    )
    fleet.publish(V2)
    fleet.run()
    assert (fleet.r(V2).state, fleet.r(V2).stage, fleet.r(V2).wave) == ("halted", "dedicated", 0)
    [canary] = fleet.got(V2, "dedicated")
    assert fleet.installed(canary) == V1  # the agent rolled back
    halt = fleet.r(V2).halt
    assert halt is not None and "canary" in halt.reason
    # Halted: more time changes nothing.
    fleet.run(seconds=3600, step_seconds=60, max_ticks=100)
    assert fleet.got(V2, "dedicated") == [canary]


def test_resume_accepts_the_failures_and_goes_on_with_the_next_wave() -> None:
    fleet = standard_fleet()
    canary: list[str] = []

    def outcome(cell: CellFacts, v: str) -> str:
        if cell.stage == "dedicated" and v == V2 and not canary:
            canary.append(cell.id)
            return "failed"
        return "succeeded"

    fleet.outcome = outcome
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "halted"
    fleet.rollouts[V2] = resume(fleet.r(V2), fleet.now)
    fleet.run()
    assert fleet.r(V2).state == "completed"
    assert fleet.installed(canary[0]) == V1  # accepted as failed; not retried
    assert len(fleet.got(V2, "dedicated")) == 20


def test_abort_sends_the_cells_that_got_a_reversible_release_back_to_their_previous_one() -> None:
    fleet = standard_fleet(RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=900)))
    fleet.publish(V2)
    fleet.run(seconds=10)
    assert fleet.r(V2).state == "soaking" and fleet.r(V2).stage == "dedicated"
    reached = [c for c in fleet.cells if fleet.installed(c) == V2]
    assert len(reached) == 4  # staging, saas and the canary
    fleet.rollouts[V2] = abort(fleet.r(V2), fleet.now)
    fleet.run()
    assert fleet.r(V2).state == "aborted" and fleet.r(V2).reverted
    assert all(fleet.installed(c) == V1 for c in fleet.cells)
    assert sorted(fleet.got(V1)) == sorted(reached)
    # An aborted release reaches no one afterwards, new cells included.
    [late] = fleet.add(1, "staging", installed=None, prefix="late")
    fleet.run()
    assert fleet.installed(late) is None


def test_abort_of_an_irreversible_release_leaves_cells_where_they_are() -> None:
    fleet = standard_fleet(RolloutPolicy(soak_seconds=SoakTimes(staging=900, saas=0, dedicated=0)))
    fleet.publish(V2, reversible=False)
    fleet.run(seconds=5)
    fleet.rollouts[V2] = abort(fleet.r(V2), fleet.now)
    fleet.run()
    assert fleet.got(V1) == []
    assert [fleet.installed(c) for c in fleet.cells if fleet.cells[c].stage == "staging"] == [
        V2,
        V2,
    ]


def test_a_wave_tolerates_the_policy_s_failures() -> None:
    policy = NO_SOAK.model_copy(update={"failure_threshold": 1})
    fleet = standard_fleet(policy)
    bad = {"ded-000", "ded-001"}
    fleet.outcome = lambda cell, v: "failed" if cell.id in bad and v == V2 else "succeeded"
    fleet.publish(V2)
    fleet.run()
    # One failure in a wave passes; two in the same wave halt. Whether these two share a wave
    # depends on the hash order, so check the rule itself.
    r = fleet.r(V2)
    waves = [w for w in (r.waves or ())]
    together = any(bad <= set(w) for w in waves)
    assert r.state == ("halted" if together else "completed")


def test_a_cell_that_does_not_report_by_the_deadline_counts_as_failed() -> None:
    policy = NO_SOAK.model_copy(update={"progress_deadline_seconds": 300})
    fleet = standard_fleet(policy)
    fleet.outcome = lambda cell, v: "silent" if cell.id == "sta-001" else "succeeded"
    fleet.publish(V2)
    fleet.run(seconds=299, step_seconds=10, max_ticks=40)
    assert fleet.r(V2).state == "in_progress"
    fleet.run(seconds=30, step_seconds=10, max_ticks=10)
    r = fleet.r(V2)
    assert r.state == "halted" and r.halt is not None
    assert [(f.cell_id, f.error) for f in r.halt.failures] == [
        ("sta-001", "no outcome reported within 300s")
    ]


# -- offline, held, pinned, new cells -------------------------------------------------------------


def test_an_offline_cell_is_skipped_and_updated_when_it_returns() -> None:
    fleet = standard_fleet()
    fleet.set("ded-005", status="offline")
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "completed" and fleet.installed("ded-005") == V1
    fleet.set("ded-005", status="online")
    fleet.run()
    assert fleet.installed("ded-005") == V2


def test_with_offline_wait_an_offline_cell_holds_its_wave_until_the_deadline() -> None:
    policy = NO_SOAK.model_copy(update={"offline_cells": "wait", "progress_deadline_seconds": 60})
    fleet = standard_fleet(policy)
    fleet.set("sta-000", status="offline")
    fleet.publish(V2)
    fleet.run(seconds=30, step_seconds=10, max_ticks=5)
    assert fleet.r(V2).state == "in_progress" and fleet.r(V2).stage == "staging"
    fleet.run(seconds=60, step_seconds=10, max_ticks=10)
    assert fleet.r(V2).state == "halted"
    assert fleet.got(V2, "saas") == []


def test_a_stage_with_cells_but_none_reachable_halts_and_resume_passes_it() -> None:
    fleet = standard_fleet()
    fleet.set("saa-000", status="offline")
    fleet.publish(V2)
    fleet.run()
    r = fleet.r(V2)
    assert (r.state, r.stage) == ("halted", "saas")
    assert r.halt is not None and "no reachable cell in stage saas" in r.halt.reason
    assert fleet.got(V2, "dedicated") == []
    fleet.rollouts[V2] = resume(r, fleet.now)
    fleet.run()
    assert fleet.r(V2).state == "completed"
    fleet.set("saa-000", status="online")
    fleet.run()
    assert fleet.installed("saa-000") == V2


def test_a_stage_without_cells_passes_at_once() -> None:
    fleet = Fleet(RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=3600, dedicated=0)))
    fleet.add(1, "staging")
    fleet.add(3, "dedicated")
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "completed"  # no saas cell: no saas soak either


def test_held_and_pinned_cells_stay_and_catch_up_when_released() -> None:
    fleet = standard_fleet()
    fleet.set("ded-001", held=True)
    fleet.set("ded-002", pinned=V1)
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "completed"
    assert fleet.installed("ded-001") == V1 and fleet.installed("ded-002") == V1
    fleet.set("ded-001", held=False)
    fleet.set("ded-002", pinned=None)
    fleet.run()
    assert fleet.installed("ded-001") == V2 and fleet.installed("ded-002") == V2


def test_a_pin_to_a_newer_release_moves_the_cell_there_and_keeps_it() -> None:
    fleet = standard_fleet()
    fleet.publish(V2)
    fleet.run()
    fleet.publish(V3)
    fleet.set("ded-003", pinned=V2)
    fleet.set("ded-004", pinned=V3)
    fleet.run()
    assert fleet.installed("ded-003") == V2 and fleet.installed("ded-004") == V3


def test_a_new_cell_gets_the_newest_release_that_reached_its_stage_as_first_install() -> None:
    fleet = standard_fleet(RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=3600, dedicated=0)))
    fleet.publish(V2)
    fleet.run(step_seconds=60)
    assert fleet.r(V2).state == "completed"
    fleet.publish(V3)
    fleet.run(seconds=10)
    assert fleet.r(V3).state == "soaking" and fleet.r(V3).stage == "saas"
    [new_ded] = fleet.add(1, "dedicated", installed=None, prefix="new-ded")
    [new_sta] = fleet.add(1, "staging", installed=None, prefix="new-sta")
    fleet.run()
    assert fleet.installed(new_ded) == V2  # V3 has not reached dedicated
    assert fleet.installed(new_sta) == V3


def test_a_new_cell_does_not_get_a_halted_release() -> None:
    fleet = standard_fleet()
    fleet.publish(V2)
    fleet.run()
    fleet.outcome = lambda cell, v: "failed" if v == V3 else "succeeded"
    fleet.publish(V3)
    fleet.run()
    assert fleet.r(V3).state == "halted"
    [new] = fleet.add(1, "staging", installed=None, prefix="new")
    fleet.run()
    assert fleet.installed(new) == V2


# -- supersede ------------------------------------------------------------------------------------


def test_a_newer_release_supersedes_an_older_one_and_no_cell_goes_backwards() -> None:
    policy = RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=100))
    fleet = standard_fleet(policy)
    fleet.publish(V2)
    fleet.run(seconds=5, max_ticks=5)
    assert fleet.r(V2).stage == "dedicated" and fleet.r(V2).state == "soaking"
    fleet.publish(V3)
    fleet.run(step_seconds=10, max_ticks=500)
    assert fleet.r(V2).state == "superseded" and fleet.r(V3).state == "completed"
    assert all(fleet.installed(c) == V3 for c in fleet.cells)
    for cid in fleet.cells:
        versions = [v for _, c, v in fleet.sent if c == cid]
        assert all(not newer(a, b) for a, b in pairwise(versions)), cid


def test_an_older_rollout_continues_where_the_newer_has_not_reached_yet() -> None:
    fleet = standard_fleet(RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=50)))
    fleet.publish(V2)
    fleet.run(seconds=5, max_ticks=5)
    fleet.publish(V3)
    fleet.rollouts[V3] = pause(fleet.r(V3), fleet.now)  # keep V3 in staging
    fleet.tick()
    assert fleet.r(V2).state == "soaking"  # not superseded: V3 has not reached dedicated
    fleet.run(step_seconds=10, max_ticks=500)
    assert fleet.r(V2).state == "completed"
    assert fleet.got(V3) == []


def test_superseded_needs_a_newer_release_at_or_past_the_older_one_s_stage() -> None:
    now = T0
    old = new_rollout(release(V2), now).model_copy(update={"stage": "saas"})
    new = new_rollout(release(V3), now)
    assert superseded([old, new]) == []
    assert superseded([old, new.model_copy(update={"stage": "saas"})]) == [V2]
    assert (
        superseded([old, new.model_copy(update={"state": "aborted", "stage": "dedicated"})]) == []
    )
    assert superseded([new.model_copy(update={"stage": "saas"}), old]) == [V2]


# -- operator actions and explain -----------------------------------------------------------------


def test_actions_refuse_states_they_do_not_apply_to() -> None:
    r = new_rollout(release(V2), T0)
    with pytest.raises(ActionRefused, match="only a paused or halted one resumes"):
        resume(r, T0)
    done = r.model_copy(update={"state": "completed"})
    for action in (pause, abort):
        with pytest.raises(ActionRefused, match="completed"):
            action(done, T0)
    paused = pause(r.model_copy(update={"state": "soaking", "soak_until": T0}), T0)
    assert resume(paused, T0).state == "soaking"


def test_a_paused_rollout_sends_nothing_until_resumed() -> None:
    fleet = standard_fleet()
    fleet.publish(V2)
    fleet.rollouts[V2] = pause(fleet.r(V2), fleet.now)
    fleet.run(seconds=100, step_seconds=10, max_ticks=20)
    assert fleet.sent == []
    fleet.rollouts[V2] = resume(fleet.r(V2), fleet.now)
    fleet.run()
    assert fleet.r(V2).state == "completed"


def test_explain_says_why_a_cell_is_not_on_the_newest_release() -> None:
    policy = RolloutPolicy(soak_seconds=SoakTimes(staging=600, saas=0, dedicated=0))
    fleet = standard_fleet(policy)
    fleet.set("ded-001", pinned=V1)
    fleet.set("ded-002", held=True)
    fleet.set("ded-003", status="offline")
    fleet.publish(V2)
    fleet.run(seconds=5, max_ticks=5)

    def why(cell_id: str) -> str:
        reason, sentence, _ = explain(
            fleet.cells[cell_id], list(fleet.rollouts.values()), policy, fleet.now
        )
        assert sentence
        return reason

    assert why("sta-000") == "up_to_date"
    assert why("ded-000") == "waiting_for_stage"
    assert why("ded-001") == "pinned"
    assert why("ded-002") == "held"
    assert why("ded-003") == "offline"
    fleet.run(seconds=700, step_seconds=100, max_ticks=20)
    assert why("ded-000") == "up_to_date"
    fleet.outcome = lambda cell, v: "failed" if cell.stage == "dedicated" else "succeeded"
    fleet.publish(V3)
    fleet.run(seconds=700, step_seconds=100, max_ticks=40)
    assert fleet.r(V3).state == "halted"
    [canary] = fleet.got(V3, "dedicated")
    assert why(canary) == "failed"
    others = [
        c.id for c in fleet.cells.values()
        if c.stage == "dedicated" and c.id != canary and c.status == "online" and not c.held
        and not c.pinned
    ]  # fmt: skip
    assert {why(c) for c in others} == {"halted"}
    assert (
        explain(CellFacts(id="x-1", stage="saas", status="created"), [], policy, T0)[0]
        == "not_registered"
    )
    assert (
        explain(CellFacts(id="x-1", stage="saas", status="online"), [], policy, T0)[0]
        == "no_release"
    )


def test_explain_names_the_wave_a_cell_waits_for() -> None:
    policy = RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=600))
    fleet = standard_fleet(policy)
    fleet.publish(V2)
    fleet.run(seconds=5, max_ticks=5)
    r = fleet.r(V2)
    assert r.stage == "dedicated" and r.waves is not None
    later = r.waves[-1][0]
    reason, sentence, _ = explain(fleet.cells[later], [r], policy, fleet.now)
    assert reason == "waiting_for_wave" and f"is in wave {len(r.waves)}" in sentence


# -- properties over random fleets ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(STAGE_ORDER), min_size=1, max_size=30),
    st.sets(st.integers(0, 29), max_size=6),
    st.sets(st.integers(0, 29), max_size=4),
    st.integers(0, 2),
)
def test_random_fleets_never_go_backwards_or_skip_a_stage(
    stages: list[str], failing: set[int], offline: set[int], threshold: int
) -> None:
    fleet = Fleet(NO_SOAK.model_copy(update={"failure_threshold": threshold}))
    for i, stage in enumerate(stages):
        fleet.cells[f"c-{i:02d}"] = CellFacts(
            id=f"c-{i:02d}", stage=stage, installed_release=V1,  # type: ignore[arg-type]
            status="offline" if i in offline else "online",
        )  # fmt: skip
    bad = {f"c-{i:02d}" for i in failing}
    fleet.outcome = lambda cell, v: "failed" if cell.id in bad else "succeeded"
    fleet.publish(V2)
    fleet.run(max_ticks=100)
    r = fleet.r(V2)
    assert r.state in ("completed", "halted")
    first: dict[str, datetime] = {}
    for t, c, v in fleet.sent:
        assert v == V2
        first.setdefault(c, t)
    # A stage's cells get the release only after every earlier stage's cells have reported.
    for c, t in first.items():
        earlier = [d for d in first if STAGE_ORDER.index(fleet.cells[d].stage)
                   < STAGE_ORDER.index(fleet.cells[c].stage)]  # fmt: skip
        assert all(first[d] < t for d in earlier)
    # Failures beyond the threshold halt before another wave starts.
    failed = [c for c in first if c in bad]
    if r.state == "completed":
        waves_failed = len(failed)
        assert waves_failed <= threshold * 7  # at most `threshold` per wave, 6 waves at most
    assert all(fleet.installed(c) in (V1, V2) for c in fleet.cells)
    assert not any(c in first for c in fleet.cells if fleet.cells[c].status == "offline")


# -- health verdicts, budgets and caps ------------------------------------------------------------


def with_stages(**stages: dict[str, object]) -> RolloutPolicy:
    return NO_SOAK.model_copy(update={"stages": StagePolicies.model_validate(stages)})


def test_a_release_unhealthy_only_on_dedicated_cells_stops_at_the_canary() -> None:
    fleet = standard_fleet()
    fleet.verdict = lambda cell, v: "unhealthy" if cell.stage == "dedicated" else "healthy"
    fleet.publish(V2)
    fleet.run()
    r = fleet.r(V2)
    assert r.state == "halted" and r.halt is not None
    [canary] = fleet.got(V2, "dedicated")
    assert fleet.installed(canary) == V1, "the canary rolled itself back"
    assert all(fleet.installed(c) == V2 for c in fleet.got(V2) if c != canary)
    assert f"{canary}: unhealthy: check web: status 503, wants 200" in r.halt.reason
    assert [(f.cell_id, f.error) for f in r.halt.failures] == [
        (canary, "unhealthy: check web: status 503, wants 200")
    ]


def test_a_cell_still_baking_is_not_yet_updated() -> None:
    fleet = standard_fleet()
    fleet.verdict = lambda cell, v: None
    fleet.publish(V2)
    fleet.run(max_ticks=20)
    r = fleet.r(V2)
    assert (r.state, r.stage) == ("in_progress", "staging")
    counts = stage_counts(r, list(fleet.cells.values()), fleet.policy, fleet.now)
    assert counts["staging"]["in_progress"] == 2 and counts["staging"]["updated"] == 0


@pytest.mark.parametrize(("bad", "state"), [(2, "completed"), (3, "halted")])
def test_a_share_budget_lets_through_exactly_the_failures_it_allows(bad: int, state: str) -> None:
    # 20 dedicated cells, "10%": two failures pass, the third halts.
    fleet = standard_fleet(with_stages(dedicated={"failure_budget": "10%"}))
    failing: list[str] = []

    def verdict(cell: CellFacts, version: str) -> str:
        if cell.stage == "dedicated" and (cell.id in failing or len(failing) < bad):
            failing.append(cell.id) if cell.id not in failing else None
            return "unhealthy"
        return "healthy"

    fleet.verdict = verdict
    fleet.publish(V2)
    fleet.run()
    r = fleet.r(V2)
    assert r.state == state
    if state == "halted":
        assert r.halt is not None and len(r.halt.failures) == 3
        assert "3 cell(s) failed in dedicated" in r.halt.reason
        assert "the stage's budget allows 2" in r.halt.reason
    else:
        assert len(fleet.got(V2, "dedicated")) == 20


def test_inconclusive_verdicts_pause_for_an_operator_or_count_as_failed() -> None:
    fleet = standard_fleet()
    fleet.verdict = lambda cell, v: "inconclusive" if cell.stage == "saas" else "healthy"
    fleet.publish(V2)
    fleet.run()
    r = fleet.r(V2)
    assert r.state == "paused" and r.halt is not None and "waits for an operator" in r.halt.reason
    assert fleet.got(V2, "dedicated") == []
    fleet.rollouts[V2] = resume(r, fleet.now)
    fleet.run()
    assert fleet.r(V2).state == "completed", "resuming accepts the inconclusive cell"

    strict = standard_fleet(with_stages(saas={"inconclusive": "fail"}))
    strict.verdict = fleet.verdict
    strict.publish(V2)
    strict.run()
    assert strict.r(V2).state == "halted"


def test_a_stage_updates_no_more_cells_at_once_than_its_cap() -> None:
    fleet = Fleet(with_stages(staging={"max_updating": 2}))
    fleet.add(5, "staging")
    fleet.verdict = lambda cell, v: "healthy"
    fleet.publish(V2)
    fleet.run()
    assert fleet.r(V2).state == "completed"
    per_tick: dict[datetime, int] = {}
    for when, _, _ in fleet.sent:
        per_tick[when] = per_tick.get(when, 0) + 1
    assert max(per_tick.values()) == 2 and sum(per_tick.values()) == 5


def test_the_release_file_and_the_policy_name_the_field_of_a_bad_check_or_budget() -> None:
    base = {"version": V2, "components": [{"name": "api", "image": "r/api",
                                           "digest": "sha256:" + "a" * 64}]}  # fmt: skip
    bad_checks = [
        (
            {
                "name": "e",
                "type": "prometheus",
                "url": "http://p",
                "query": "q",
                "comparison": "=<",
                "threshold": 1,
            },
            "health.checks.0.prometheus.comparison",
        ),
        ({"name": "w", "type": "http", "url": "ftp://x"}, "health.checks.0.http.url"),
        ({"name": "c", "type": "command", "command": []}, "health.checks.0.command.command"),
        ({"name": "w", "type": "http", "url": "http://x", "treshold": 1}, "treshold"),
        ({"name": "w", "type": "gauge"}, "health.checks.0"),
    ]
    for check, field_named in bad_checks:
        with pytest.raises(ValidationError, match=re.escape(field_named)):
            ReleaseFile.model_validate({**base, "health": {"checks": [check]}})
    with pytest.raises(ValidationError, match="repeated: w"):
        ReleaseFile.model_validate({**base, "health": {"checks": [
            {"name": "w", "type": "http", "url": "http://x"}] * 2}})  # fmt: skip
    for budget in ("110%", "-1", -1, "ten"):
        with pytest.raises(ValidationError, match=r"stages\.dedicated\.failure_budget"):
            RolloutPolicy.model_validate({"stages": {"dedicated": {"failure_budget": budget}}})
    policy = RolloutPolicy.model_validate({"stages": {"dedicated": {"failure_budget": "10%"}}})
    assert policy.stages.dedicated.allowed(29, 0) == 2 and policy.stages.saas.allowed(5, 1) == 1


# -- upgrade paths --------------------------------------------------------------------------------


def test_a_cell_two_releases_behind_installs_the_required_one_first() -> None:
    fleet = standard_fleet(dedicated=2)
    [late] = fleet.add(1, "dedicated", status="offline", prefix="late")
    fleet.verdict = lambda cell, v: "healthy"
    fleet.publish(V2, required=True)
    fleet.run()
    fleet.publish(V3)
    fleet.run()
    assert fleet.r(V3).state == "completed" and fleet.installed(late) == V1
    on_time = fleet.of_stage("dedicated")[0]
    assert [v for _, c, v in fleet.sent if c == on_time] == [V2, V3]

    fleet.set(late, status="online")  # back after weeks
    fleet.run()
    assert [v for _, c, v in fleet.sent if c == late] == [V2, V3], "the required one first"
    assert fleet.installed(late) == V3


def test_a_cell_whose_required_step_fails_goes_no_further() -> None:
    fleet = standard_fleet(dedicated=2)
    [late] = fleet.add(1, "dedicated", status="offline", prefix="late")
    fleet.publish(V2, required=True)
    fleet.run()
    fleet.publish(V3)
    fleet.run()
    fleet.verdict = lambda cell, v: "unhealthy" if cell.id == late and v == V2 else "healthy"
    fleet.set(late, status="online")
    fleet.run()
    assert [v for _, c, v in fleet.sent if c == late] == [V2]
    assert fleet.installed(late) == V1
    reason, sentence, _ = explain(fleet.cells[late], list(fleet.rollouts.values()),
                                  fleet.policy, fleet.now)  # fmt: skip
    assert reason == "failed" and V2 in sentence
