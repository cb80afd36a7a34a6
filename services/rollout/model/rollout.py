"""A release's rollout: the state the controller keeps between steps."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict

from common.releases import Release
from common.requests.rollout import Halt
from common.versions import SemVer
from common.vocabulary import RolloutState, Stage


class Rollout(BaseModel):
    """One release's way through the fleet, as the controller keeps it between steps."""

    model_config = ConfigDict(frozen=True)

    version: str
    reversible: bool = True
    # A required release: every cell behind it installs it before anything newer.
    required: bool = False
    # A component requires maintenance: a cell with windows gets it inside one only.
    requires_maintenance: bool = False
    # Past this, no customer's deferral holds it (a security release's, or the release's own).
    deadline: datetime | None = None
    state: RolloutState = "in_progress"
    stage: Stage = "staging"
    # The current stage's waves, fixed when the stage starts (None: not started yet).
    waves: tuple[tuple[str, ...], ...] | None = None
    wave: int = 0
    wave_started_at: datetime | None = None
    soak_until: datetime | None = None
    # Stages whose first wave finished: a cell of such a stage that was not in a wave
    # (registered since, or offline then) gets the release when it can.
    reached: tuple[Stage, ...] = ()
    # Cells whose failure an operator accepted by resuming; they no longer count.
    accepted: tuple[str, ...] = ()
    halt: Halt | None = None
    # Set once an abort of a reversible release has sent its cells back.
    reverted: bool = False
    # Who published it: the one operator who may not approve it (the two-person rule).
    published_by: str = ""
    # Stages a second operator approved it into, and by whom.
    approved: tuple[tuple[Stage, str], ...] = ()
    # Stages that start no earlier than a time (a scheduled start).
    starts_at: tuple[tuple[Stage, datetime], ...] = ()
    # Why the current stage has not started: an approval or its start time it waits for.
    waiting: str | None = None
    # Cells whose failed update an operator asked to try again; the next step sends them.
    retry: tuple[str, ...] = ()
    created_at: datetime
    updated_at: datetime
    # Bumped by every write, so a write based on an older read is refused.
    rev: int = 0

    @property
    def semver(self) -> SemVer:
        parsed = SemVer.parse(self.version)
        assert parsed is not None  # releases are validated at publish
        return parsed

    def started_cells(self) -> set[str]:
        return {c for wave in (self.waves or ())[: self.wave + 1] for c in wave}

    def waiting_cells(self) -> set[str]:
        return {c for wave in (self.waves or ())[self.wave + 1 :] for c in wave}


def new_rollout(
    release: Release,
    now: datetime,
    *,
    by: str = "",
    starts_at: datetime | None = None,
    security_deadline: timedelta | None = None,
) -> Rollout:
    deadline = release.deadline
    if release.security and security_deadline is not None:
        own = now + security_deadline
        deadline = own if deadline is None else min(deadline, own)
    return Rollout(
        version=release.version,
        reversible=release.reversible,
        required=release.required,
        requires_maintenance=any(c.requires_maintenance for c in release.components),
        deadline=deadline,
        published_by=by,
        starts_at=(("staging", starts_at),) if starts_at is not None else (),
        created_at=now,
        updated_at=now,
    )
