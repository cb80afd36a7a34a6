"""What an operator can do to a rollout: pause, resume, abort. Each returns the rollout as it
should be written, or refuses with the reason."""

from __future__ import annotations

from datetime import datetime

from common.vocabulary import ACTIVE_STATES, RUNNING_STATES, RolloutState
from services.rollout.model.rollout import Rollout


class ActionRefused(Exception):
    """An operator action that does not apply to the rollout's state (the message says why)."""


def pause(r: Rollout, now: datetime) -> Rollout:
    if r.state not in RUNNING_STATES:
        raise ActionRefused(f"rollout {r.version} is {r.state}; only a running one can be paused")
    return r.model_copy(update={"state": "paused", "updated_at": now})


def resume(r: Rollout, now: datetime) -> Rollout:
    """Continue a paused or halted rollout. Resuming a halt accepts its failed cells (they stay
    on the release they are on) and goes on with the next wave; a stage halted for having no
    reachable cell is passed, and its cells get the release when they return."""
    if r.state == "paused":
        state: RolloutState = "soaking" if r.soak_until is not None else "in_progress"
        # Paused by the policy for inconclusive verdicts: resuming accepts those cells.
        judged = tuple(f.cell_id for f in (r.halt.failures if r.halt else ()))
        return r.model_copy(
            update={
                "state": state,
                "halt": None,
                "accepted": r.accepted + judged,
                "updated_at": now,
            }
        )
    if r.state != "halted":
        raise ActionRefused(
            f"rollout {r.version} is {r.state}; only a paused or halted one resumes"
        )
    accepted = r.accepted + tuple(f.cell_id for f in (r.halt.failures if r.halt else ()))
    waves = r.waves if r.waves is not None else ()
    return r.model_copy(
        update={
            "state": "in_progress",
            "halt": None,
            "accepted": accepted,
            "waves": waves,
            "updated_at": now,
        }
    )


def abort(r: Rollout, now: datetime) -> Rollout:
    if r.state not in ACTIVE_STATES:
        raise ActionRefused(f"rollout {r.version} is {r.state}; there is nothing to abort")
    return r.model_copy(update={"state": "aborted", "reverted": False, "updated_at": now})
