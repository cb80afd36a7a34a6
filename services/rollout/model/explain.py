"""Why a cell is (or is not) on the newest release: ``rollout explain``.

The answer is the first of :data:`CASES` whose condition holds, so the order of the table is
the order of precedence (a decommissioned cell is that before anything else; a pinned cell is
pinned whatever the rollout does; and so on)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from common.requests.rollout import RolloutPolicy
from common.vocabulary import STAGES, ExplainReason
from services.rollout.model.cells import (
    CellFacts,
    CellProgress,
    at_least,
    cell_progress,
    failure_of,
)
from services.rollout.model.rollout import Rollout
from services.rollout.model.windows import Windows


@dataclass(frozen=True)
class Situation:
    """A cell, the rollouts and the time: what every case reads."""

    cell: CellFacts
    rollouts: list[Rollout]
    policy: RolloutPolicy
    now: datetime
    windows: Windows | None = None

    @cached_property
    def deferred(self) -> bool:
        return (
            self.newest is not None
            and self.windows is not None
            and self.windows.deferred(self.cell, self.newest.version, self.now)
        )

    @cached_property
    def window_opens(self) -> datetime | None:
        """When the cell's maintenance window opens, if the newest release waits for it."""
        if self.newest is None or self.windows is None:
            return None
        return self.windows.opens(self.cell, self.newest.version, self.now)

    @cached_property
    def newest(self) -> Rollout | None:
        """The newest release's rollout that was not aborted."""
        live = [r for r in self.rollouts if r.state != "aborted"]
        return max(live, key=lambda r: r.semver) if live else None

    @property
    def v(self) -> str:
        assert self.newest is not None
        return self.newest.version

    @property
    def installed(self) -> str:
        return self.cell.installed_release or "nothing"

    @cached_property
    def in_flight(self) -> str | None:
        """The release the cell was last sent, while it does not count as updated to it (its
        own report decides: one baking or unhealthy may already run it)."""
        cell = self.cell
        sent = cell.desired_version if cell.desired_generation is not None else None
        if sent is None or cell_progress(cell, sent, self.policy, self.now) == "updated":
            return None
        if cell.report_generation != cell.desired_generation and at_least(
            cell.installed_release, sent
        ):
            return None  # it runs it; whatever it was sent is in its past
        return sent

    @cached_property
    def progress(self) -> CellProgress | None:
        """How the cell is doing with the release in flight."""
        if self.in_flight is None:
            return None
        return cell_progress(self.cell, self.in_flight, self.policy, self.now)

    @property
    def stage_order(self) -> tuple[int, int]:
        """The cell's stage and the newest rollout's, as positions in the order of stages."""
        assert self.newest is not None
        return STAGES.index(self.cell.stage), STAGES.index(self.newest.stage)

    @property
    def waits_for_stage(self) -> bool:
        """The newest rollout has not reached the cell's stage: a later stage, or the cell's
        own stage while it soaks before the cell was in a wave."""
        newest = self.newest
        assert newest is not None
        mine, theirs = self.stage_order
        return mine > theirs or (
            mine == theirs
            and newest.state == "soaking"
            and self.cell.id not in newest.started_cells()
            and self.cell.stage not in newest.reached
        )


def _failed(s: Situation) -> str:
    cell = s.cell
    again = ""
    if cell.report_phase == "failed" and cell.report_verdict is None:
        again = f" It is sent it again {s.policy.retry_failed_seconds:g}s after it failed."
    return (
        f"Updating {cell.id} to {s.in_flight} failed"
        f" ({failure_of(cell, s.progress or 'failed', s.policy)});"
        f" it runs {s.installed} and waits for a newer release or an operator.{again}"
    )


def _updating(s: Situation) -> str:
    cell = s.cell
    if cell.desired_for is not None and cell.desired_version != cell.desired_for:
        return (
            f"{cell.id} walks its upgrade path to {cell.desired_for}: it installs"
            f" {cell.desired_version}, a required release, first."
        )
    if cell.report_generation == cell.desired_generation and cell.report_phase == "succeeded":
        return (
            f"{cell.id} applied {s.in_flight} and is checking its health"
            f" (a bake of {cell.desired_bake or 0:g}s); it counts once its verdict is healthy."
        )
    return f"{cell.id} is being updated to {s.in_flight}."


def _halt_reason(s: Situation) -> str:
    assert s.newest is not None
    why = f": {s.newest.halt.reason}" if s.newest.halt else ""
    return f"The rollout of {s.v} is {s.newest.state}{why}."


def _stage_wait(s: Situation) -> str:
    assert s.newest is not None
    until = s.newest.soak_until
    soak = f", soaking until {until.isoformat()}" if until else ""
    return (
        f"{s.v} is in stage {s.newest.stage}{soak}; {s.cell.id} is in {s.cell.stage},"
        " which comes later."
    )


def _window_wait(s: Situation) -> str:
    assert s.window_opens is not None and s.windows is not None
    windows = s.windows.set_of(s.cell)
    zone = windows.time_zone if windows is not None else "UTC"
    local = s.window_opens.astimezone(windows.zone if windows is not None else None)
    return (
        f"{s.cell.id} waits for its window at {s.window_opens.isoformat()}"
        f" ({local.strftime('%a %H:%M')} {zone}) to get {s.v}, which needs one."
    )


def _gated(s: Situation, why: str) -> bool:
    """The newest rollout waits to start the cell's own stage, for ``why``."""
    r = s.newest
    return (
        r is not None
        and r.stage == s.cell.stage
        and r.waves is None
        and r.waiting is not None
        and r.waiting.startswith(why)
    )


def _waiting(s: Situation) -> str:
    assert s.newest is not None and s.newest.waiting is not None
    return s.newest.waiting


def _wave_wait(s: Situation) -> str:
    assert s.newest is not None
    waves = s.newest.waves or ()
    n = next(i for i, w in enumerate(waves) if s.cell.id in w)
    return (
        f"{s.v} is in {s.newest.stage} wave {s.newest.wave + 1} of {len(waves)};"
        f" {s.cell.id} is in wave {n + 1}."
    )


@dataclass(frozen=True)
class Case:
    reason: ExplainReason
    holds: Callable[[Situation], bool]
    says: Callable[[Situation], str]
    # The release the answer is about.
    about: Callable[[Situation], str | None]


def _newest(s: Situation) -> str | None:
    return s.newest.version if s.newest else None


def _in_flight(s: Situation) -> str | None:
    return s.in_flight


def _nothing(s: Situation) -> str | None:
    return None


CASES: tuple[Case, ...] = (
    Case(
        "decommissioned",
        lambda s: s.cell.status == "decommissioned",
        lambda s: f"{s.cell.id} is decommissioned and gets no releases.",
        _nothing,
    ),
    Case(
        "not_registered",
        lambda s: s.cell.status == "created",
        lambda s: f"{s.cell.id} has not registered yet; its agent has not connected.",
        _nothing,
    ),
    Case(
        "no_release",
        lambda s: s.newest is None,
        lambda s: "No release has been published (or every one was aborted).",
        _nothing,
    ),
    Case(
        "pinned",
        lambda s: s.cell.pinned is not None,
        lambda s: (
            f"{s.cell.id} is pinned to {s.cell.pinned} by an operator (`cells unpin` releases it)."
        ),
        _newest,
    ),
    # What the cell reports on the release it was sent comes before what it runs: a cell that
    # baked the newest release and turned unhealthy runs it, and is not up to date.
    Case("failed", lambda s: s.progress in ("failed", "timed_out"), _failed, _in_flight),
    Case(
        "inconclusive",
        lambda s: s.progress == "inconclusive",
        lambda s: (
            f"{s.cell.id}'s health after {s.in_flight} is inconclusive"
            f" ({failure_of(s.cell, 'inconclusive', s.policy)}); an operator decides."
        ),
        _in_flight,
    ),
    Case("in_progress", lambda s: s.progress == "in_progress", _updating, _in_flight),
    Case(
        "up_to_date",
        lambda s: at_least(s.cell.installed_release, s.v),
        lambda s: f"{s.cell.id} runs {s.installed}, the newest release.",
        _newest,
    ),
    Case(
        "held",
        lambda s: s.cell.held,
        lambda s: (
            f"{s.cell.id} is held: its infrastructure template is past its deadline"
            f"{f' ({s.cell.hold_deadline})' if s.cell.hold_deadline else ''}, so it gets"
            " no application update until the new template is applied."
        ),
        _newest,
    ),
    Case(
        "offline",
        lambda s: s.cell.status == "offline",
        lambda s: f"{s.cell.id} is offline; it is updated when it comes back.",
        _newest,
    ),
    Case(
        "halted",
        lambda s: s.newest is not None and s.newest.state == "halted",
        _halt_reason,
        _newest,
    ),
    Case(
        "paused",
        lambda s: s.newest is not None and s.newest.state == "paused",
        _halt_reason,
        _newest,
    ),
    Case(
        "deferred",
        lambda s: s.deferred,
        lambda s: (
            f"{s.cell.id}'s customer deferred updates until"
            f" {s.cell.deferred_until.isoformat() if s.cell.deferred_until else '-'}"
            f" ({s.cell.deferral_reason or 'no reason given'}); {s.v} reaches it then."
        ),
        _newest,
    ),
    Case(
        "waiting_for_approval",
        lambda s: _gated(s, "waits for approval"),
        lambda s: f"{s.cell.id} is in {s.cell.stage}; {s.v} {_waiting(s)}.",
        _newest,
    ),
    Case(
        "scheduled",
        lambda s: _gated(s, ""),
        lambda s: f"{s.cell.id} is in {s.cell.stage}; {s.v}: {_waiting(s)}.",
        _newest,
    ),
    Case("waiting_for_stage", lambda s: s.waits_for_stage, _stage_wait, _newest),
    Case(
        "waiting_for_wave",
        lambda s: s.newest is not None and s.cell.id in s.newest.waiting_cells(),
        _wave_wait,
        _newest,
    ),
    Case(
        "waiting_for_window",
        lambda s: s.window_opens is not None,
        _window_wait,
        _newest,
    ),
    # Nothing holds it back: the next step sends it the release.
    Case(
        "in_progress",
        lambda s: True,
        lambda s: f"{s.cell.id} is due to get {s.v} on the controller's next step.",
        _newest,
    ),
)


def explain(
    cell: CellFacts,
    rollouts: list[Rollout],
    policy: RolloutPolicy,
    now: datetime,
    windows: Windows | None = None,
) -> tuple[ExplainReason, str, str | None]:
    """Why ``cell`` is (or is not) on the newest release: a reason, a sentence, and the release
    the answer is about."""
    s = Situation(cell, rollouts, policy, now, windows)
    case = next(c for c in CASES if c.holds(s))
    return case.reason, case.says(s), case.about(s)
