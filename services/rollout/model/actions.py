"""What an operator can do to a rollout: pause, resume, abort, approve, promote, retry and
schedule. Each returns the rollout as it should be written, or refuses with the reason."""

from __future__ import annotations

from datetime import datetime

from common.vocabulary import ACTIVE_STATES, RUNNING_STATES, STAGES, RolloutState, Stage
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


def _started(r: Rollout, stage: Stage) -> bool:
    """Whether ``stage`` has started for the rollout (its waves are fixed, or it is past)."""
    here, there = STAGES.index(r.stage), STAGES.index(stage)
    return there < here or (there == here and r.waves is not None)


def approve(r: Rollout, now: datetime, by: str, stage: Stage | None = None) -> Rollout:
    """A second operator lets the release into ``stage`` (by default the one it waits at).
    Its publisher may not: that is the two-person rule."""
    if r.state not in ACTIVE_STATES:
        raise ActionRefused(f"rollout {r.version} is {r.state}; there is nothing to approve")
    if stage is None:
        if not (r.waiting or "").startswith("waits for approval"):
            raise ActionRefused(
                f"rollout {r.version} waits for no approval now; name the stage to approve"
                " it ahead (--stage)"
            )
        stage = r.stage
    if by and by == r.published_by:
        raise ActionRefused(
            f"{by} published {r.version}: another operator must approve it (two-person rule)"
        )
    if _started(r, stage):
        raise ActionRefused(f"rollout {r.version} has already started {stage}")
    if stage in dict(r.approved):
        return r
    return r.model_copy(update={"approved": (*r.approved, (stage, by)), "updated_at": now})


def promote(r: Rollout, now: datetime) -> Rollout:
    """Skip the rest of the current soak: the next wave or stage starts at the next step."""
    if r.state != "soaking":
        raise ActionRefused(f"rollout {r.version} is {r.state}; only a soaking one can be promoted")
    return r.model_copy(update={"soak_until": now, "updated_at": now})


def retry(r: Rollout, now: datetime) -> Rollout:
    """Send the release again to the cells whose update failed (the next step picks them out
    of the started waves and the accepted cells). A rollout halted or paused on them carries on
    and counts them again."""
    if r.state not in ACTIVE_STATES:
        raise ActionRefused(
            f"rollout {r.version} is {r.state}; a failed cell of an ended rollout is sent its"
            " release again by the controller after the policy's retry_failed_seconds"
        )
    cells = tuple(sorted(r.started_cells() | set(r.accepted)))
    update: dict[str, object] = {"retry": cells, "updated_at": now}
    if r.halt is not None:
        update |= {"state": "in_progress", "halt": None}
    return r.model_copy(update=update)


def schedule(r: Rollout, now: datetime, stage: Stage, at: datetime | None) -> Rollout:
    """``stage`` starts no earlier than ``at`` (None: as soon as it can)."""
    if r.state not in ACTIVE_STATES:
        raise ActionRefused(f"rollout {r.version} is {r.state}; there is nothing to schedule")
    if _started(r, stage):
        raise ActionRefused(f"rollout {r.version} has already started {stage}")
    if at is not None and at <= now:
        raise ActionRefused(f"at: {at.isoformat()} is in the past (now {now.isoformat()})")
    starts = tuple((s, t) for s, t in r.starts_at if s != stage)
    if at is not None:
        starts = (*starts, (stage, at))
    return r.model_copy(update={"starts_at": starts, "updated_at": now})
