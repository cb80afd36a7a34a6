"""One step of the controller for one rollout (:func:`step`), and which older rollouts a newer
release stops (:func:`superseded`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from common.messages import (
    CellFailure,
    Event,
    RolloutCompleted,
    RolloutHalted,
    RolloutProgressed,
)
from common.requests.rollout import Halt, RolloutPolicy
from common.vocabulary import ACTIVE_STATES, REGISTERED, STAGES, Stage
from services.rollout.model.cells import (
    BUCKET,
    COUNT_KEYS,
    CellFacts,
    cell_progress,
    failure_of,
)
from services.rollout.model.plan import split_waves
from services.rollout.model.rollout import Rollout
from services.rollout.model.windows import Windows

# A step moves a rollout as far as it can go now: at most one wave per wave and one start per
# stage, so the stages and every dedicated wave bound the passes; the rest is headroom for
# soaks of zero and halts. A step that still moves after this many passes is a bug, and the
# next step carries on from what was written.
MAX_MOVES = 2 * len(STAGES) + 16
# The generation of a desired state decided in this step: the store draws the real one when it
# writes the step, so within the step the cell only needs to look "sent".
SENT_THIS_STEP = -1


@dataclass(frozen=True)
class Assign:
    """Send ``cell_id`` a desired state for ``version`` (None: nothing installed)."""

    cell_id: str
    version: str | None
    previous: str | None
    # The incarnation of the cell it is sent to ("": not known).
    incarnation: str = ""
    # Set when ``version`` is a step on an upgrade path: the release the path leads to.
    path_to: str | None = None


@dataclass
class Decision:
    rollout: Rollout
    assign: list[Assign] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # Cells of the current wave whose outcome the rollout now waits for: until that many
    # outcomes are reported, another step cannot finish the wave.
    awaiting: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.assign or self.events)


def stage_counts(
    rollout: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime
) -> dict[str, dict[str, int]]:
    """Per stage: cells ``total``, ``updated``, ``in_progress``, ``failed``,
    ``inconclusive``, ``offline``,
    ``held``, ``pinned`` and ``pending`` for this release (decommissioned cells not counted)."""
    counts: dict[str, dict[str, int]] = {stage: dict.fromkeys(COUNT_KEYS, 0) for stage in STAGES}
    for cell in cells:
        progress = cell_progress(cell, rollout.version, policy, now)
        if progress == "decommissioned":
            continue
        counts[cell.stage]["total"] += 1
        counts[cell.stage][BUCKET[progress]] += 1
    return counts


def _progressed(r: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime) -> Event:
    counts = stage_counts(r, cells, policy, now)[r.stage]
    return RolloutProgressed(
        at=now, version=r.version, state=r.state, stage=r.stage, wave=r.wave, counts=counts
    )


class _Stepper:
    """One step of one rollout: a small state machine over an immutable Rollout."""

    def __init__(
        self,
        r: Rollout,
        cells: list[CellFacts],
        policy: RolloutPolicy,
        now: datetime,
        required: tuple[str, ...] = (),
        *,
        windows: Windows | None = None,
    ) -> None:
        self.r = r
        self.required = required
        # Its own when none is given: a view counts what it held back.
        self.windows = windows or Windows()
        self.by_id = {c.id: c for c in cells}
        self.policy = policy
        self.now = now
        self.assign: list[Assign] = []
        self.events: list[Event] = []
        self.awaiting = 0

    @property
    def cells(self) -> list[CellFacts]:
        return list(self.by_id.values())

    def update(self, **changes: object) -> None:
        self.r = self.r.model_copy(update={**changes, "updated_at": self.now})

    def run(self) -> Decision:
        start = self.r
        for _ in range(MAX_MOVES):
            before = self.r
            self.one()
            if self.r == before:
                break
        quiet = any(isinstance(e, RolloutHalted | RolloutCompleted) for e in self.events)
        if self.r != start and not quiet:
            self.events.append(_progressed(self.r, self.cells, self.policy, self.now))
        return Decision(self.r, self.assign, self.events, self.awaiting)

    def one(self) -> None:
        r = self.r
        self.awaiting = 0  # what the last move left waiting is what counts
        if r.retry:
            self.send_again()
        elif r.state == "aborted" and not r.reverted:
            self.revert()
        elif r.state == "soaking" and r.soak_until is not None and self.now >= r.soak_until:
            self.update(state="in_progress", soak_until=None)
            self.next_wave()
        elif r.state == "in_progress":
            if r.waves is None:
                self.start_stage()
            else:
                self.evaluate_wave()

    def revert(self) -> None:
        """Abort: a reversible release's cells go back to the release they had before."""
        if self.r.reversible:
            for cell in self.cells:
                sent = cell.desired_generation is not None
                if (
                    sent
                    and cell.desired_version == self.r.version
                    and cell.status != "decommissioned"
                ):
                    self.assign.append(
                        Assign(
                            cell.id,
                            cell.previous_version,
                            cell.installed_release,
                            cell.incarnation or "",
                        )
                    )
        self.update(reverted=True)

    def send_again(self) -> None:
        """The cells an operator asked to retry whose update failed get the release again;
        they count as the wave's again, no longer accepted."""
        r = self.r
        for cell_id in r.retry:
            cell = self.by_id.get(cell_id)
            if cell is None or cell.status == "decommissioned":
                continue
            progress = cell_progress(cell, r.version, self.policy, self.now)
            if progress in ("failed", "timed_out", "inconclusive"):
                self.send(cell, r.version)
        accepted = tuple(c for c in r.accepted if c not in r.retry)
        self.update(retry=(), accepted=accepted)

    def gate(self) -> str | None:
        """Why the current stage may not start yet: its scheduled start, or the approval the
        policy asks for; None when it may."""
        r = self.r
        at = dict(r.starts_at).get(r.stage)
        if at is not None and self.now < at:
            return f"{r.stage} starts at {at.isoformat()} (scheduled)"
        if r.stage in self.policy.approval_stages and r.stage not in dict(r.approved):
            asked = r.published_by or "its publisher"
            return (
                f"waits for approval to enter {r.stage} (asked by {asked}): another operator"
                f" runs rollout approve {r.version}"
            )
        return None

    def start_stage(self) -> None:
        r, policy = self.r, self.policy
        members = [c for c in self.cells if c.stage == r.stage and c.status in REGISTERED]
        progress = {c.id: cell_progress(c, r.version, policy, self.now) for c in members}
        needing = [c for c in members if progress[c.id] in ("pending", "offline", "in_progress")]
        gate = self.gate() if needing else None
        if gate != r.waiting:
            self.update(waiting=gate)
        if gate is not None:
            return
        if policy.offline_cells == "skip":
            targets = [c.id for c in needing if c.status == "online"]
        else:
            targets = [c.id for c in needing]
        if needing and not [c for c in needing if c.status == "online"]:
            self.halt(f"no reachable cell in stage {r.stage}: all {len(needing)} are offline", ())
            return
        if not targets:
            # Nothing to update here; nothing to bake either.
            self.update(waves=(), wave=0, reached=_add(r.reached, r.stage))
            self.next_stage()
            return
        if r.stage == "dedicated":
            waves = tuple(tuple(w) for w in split_waves(targets, r.version, policy.waves))
        else:
            waves = (tuple(sorted(targets)),)
        self.update(waves=waves, wave=0, wave_started_at=self.now)
        self.evaluate_wave()

    def evaluate_wave(self) -> None:
        r, policy = self.r, self.policy
        assert r.waves is not None
        stage_policy = policy.stages.of(r.stage)
        wave = r.waves[r.wave] if r.wave < len(r.waves) else ()
        offline_waiting = False  # offline cells the wave waits for (no outcome to count)
        failures: list[CellFailure] = []
        inconclusive: list[CellFailure] = []
        pending: list[CellFacts] = []
        updating = 0
        deadline = timedelta(seconds=policy.progress_deadline_seconds)
        for cell_id in wave:
            cell = self.by_id.get(cell_id)
            if cell is None:
                continue
            progress = cell_progress(cell, r.version, policy, self.now)
            if progress == "pending":
                pending.append(cell)
            elif progress == "in_progress":
                self.awaiting += 1
                updating += 1
            elif progress == "offline" and policy.offline_cells == "wait":
                started = r.wave_started_at or self.now
                if self.now - started > deadline:
                    progress = "timed_out"
                    failures.append(
                        CellFailure(cell_id=cell_id, error=failure_of(cell, "offline", policy))
                    )
                else:
                    offline_waiting = True
            counted = cell_id in r.accepted or any(f.cell_id == cell_id for f in failures)
            if progress in ("failed", "timed_out") and not counted:
                failures.append(
                    CellFailure(cell_id=cell_id, error=failure_of(cell, progress, policy))
                )
            elif progress == "inconclusive" and not counted:
                judged = CellFailure(cell_id=cell_id, error=failure_of(cell, progress, policy))
                (failures if stage_policy.inconclusive == "fail" else inconclusive).append(judged)
        for cell in pending:
            if self.windows.deferred(cell, r.version, self.now):
                # Its customer deferred updates: the wave goes on without it, and it catches
                # up once the deferral ends (model/catch_up.py).
                continue
            if self.windows.hold(cell, r.version, self.now):
                # Outside its maintenance window: the wave waits for it (waves keep their
                # order, and the canary stays first).
                self.awaiting += 1
                continue
            # A stage's cap on cells updating at once: the rest wait for a free place.
            if stage_policy.max_updating is None or updating < stage_policy.max_updating:
                self.send(cell, r.version)
                updating += 1
            self.awaiting += 1
        if stage_policy.failure_budget is not None:
            # A stage with a budget counts every cell it started: one of an earlier wave that
            # turned unhealthy in its watch counts against the release too.
            failures = [*self.earlier_failures(wave), *failures]
        allowed = stage_policy.allowed(sum(len(w) for w in r.waves), policy.failure_threshold)
        if len(failures) > allowed:
            self.halt(self.too_many(failures, allowed), tuple(failures))
        elif inconclusive:
            self.wait_for_operator(inconclusive)
        elif not (self.awaiting or offline_waiting):
            self.wave_done()

    def earlier_failures(self, wave: tuple[str, ...]) -> list[CellFailure]:
        r = self.r
        assert r.waves is not None
        out = []
        for earlier in r.waves[: r.wave]:
            for cell_id in earlier:
                cell = self.by_id.get(cell_id)
                if cell is None or cell_id in r.accepted or cell_id in wave:
                    continue
                progress = cell_progress(cell, r.version, self.policy, self.now)
                if progress in ("failed", "timed_out"):
                    error = failure_of(cell, progress, self.policy)
                    out.append(CellFailure(cell_id=cell_id, error=error))
        return out

    def too_many(self, failures: list[CellFailure], allowed: int) -> str:
        r, policy = self.r, self.policy
        label = (
            "canary"
            if r.stage == "dedicated" and r.wave == 0 and policy.waves.canary
            else f"wave {r.wave + 1}"
        )
        if policy.stages.of(r.stage).failure_budget is None:
            tolerates = f"the wave tolerates {allowed}"
        else:
            tolerates = f"the stage's budget allows {allowed}"
        first = failures[0]
        return (
            f"{len(failures)} cell(s) failed in {r.stage} {label} ({tolerates});"
            f" {first.cell_id}: {first.error}"
        )

    def wait_for_operator(self, inconclusive: list[CellFailure]) -> None:
        """Inconclusive verdicts, and a policy that asks an operator to judge them: the
        rollout pauses (resume accepts the cells, abort sends them back)."""
        first = inconclusive[0]
        reason = (
            f"{len(inconclusive)} cell(s) inconclusive in {self.r.stage}; the policy waits for"
            f" an operator; {first.cell_id}: {first.error}"
        )
        self.update(state="paused", halt=Halt(reason=reason, failures=tuple(inconclusive)))
        self.events.append(
            RolloutHalted(
                at=self.now,
                version=self.r.version,
                stage=self.r.stage,
                wave=self.r.wave,
                reason=reason,
                failures=tuple(inconclusive),
            )
        )

    def send(self, cell: CellFacts, version: str) -> None:
        self.assign.append(Assign(cell.id, version, cell.installed_release, cell.incarnation or ""))
        cell = replace(
            cell,
            desired_version=version,
            desired_generation=SENT_THIS_STEP,
            desired_at=self.now,
            previous_version=cell.installed_release,
        )
        self.by_id[cell.id] = cell

    def halt(self, reason: str, failures: tuple[CellFailure, ...]) -> None:
        r = self.r
        self.update(state="halted", halt=Halt(reason=reason, failures=failures))
        self.events.append(
            RolloutHalted(
                at=self.now,
                version=r.version,
                stage=r.stage,
                wave=r.wave,
                reason=reason,
                failures=failures,
            )
        )

    def wave_done(self) -> None:
        r = self.r
        self.update(reached=_add(r.reached, r.stage))
        assert r.waves is not None
        last_stage = r.stage == STAGES[-1]
        last_wave = r.wave + 1 >= len(r.waves)
        soak = self.policy.soak_seconds.of(r.stage)
        if last_stage and last_wave:
            self.complete()
        elif soak > 0:
            self.update(state="soaking", soak_until=self.now + timedelta(seconds=soak))
        else:
            self.next_wave()

    def complete(self) -> None:
        """Done: every cell is reached. The last stage's waves keep their number (the views
        say "wave 3 of 3"), not their cells: the ids of a 100,000-cell stage were most of what
        the controller read of its rollouts at every step, long after they were needed."""
        waves = self.r.waves
        self.update(state="completed", waves=None if waves is None else tuple(() for _ in waves))
        self.events.append(RolloutCompleted(at=self.now, version=self.r.version))
        self.events.append(_progressed(self.r, self.cells, self.policy, self.now))

    def next_wave(self) -> None:
        r = self.r
        if r.waves is not None and r.wave + 1 < len(r.waves):
            self.update(wave=r.wave + 1, wave_started_at=self.now)
        else:
            self.next_stage()

    def next_stage(self) -> None:
        r = self.r
        index = STAGES.index(r.stage)
        if index + 1 >= len(STAGES):
            self.complete()
            return
        self.update(stage=STAGES[index + 1], waves=None, wave=0, wave_started_at=None)


def _add(stages: tuple[Stage, ...], stage: Stage) -> tuple[Stage, ...]:
    return stages if stage in stages else (*stages, stage)


def step(
    r: Rollout,
    cells: list[CellFacts],
    policy: RolloutPolicy,
    now: datetime,
    required: tuple[str, ...] = (),
    *,
    windows: Windows | None = None,
) -> Decision:
    """What the controller does next for one rollout: the rollout's new state, the desired
    states to send and the events to announce. Calling it again with the result changes
    nothing, so a step that was written is never repeated and one that was not is redone.
    ``required``: the required releases (model/path.py), which cells install on the way;
    ``windows``: the cells' maintenance windows (model/windows.py)."""
    return _Stepper(r, cells, policy, now, required, windows=windows).run()


def superseded(rollouts: list[Rollout]) -> list[str]:
    """Active rollouts that a newer release has caught up with: once a newer release has
    started the stage an older one is in, the older one stops and the newer carries on."""
    out = []
    for old in rollouts:
        if old.state not in ACTIVE_STATES:
            continue
        for new in rollouts:
            if new.state in ("aborted",) or not new.semver > old.semver:
                continue
            if new.state == "completed" or STAGES.index(new.stage) >= STAGES.index(old.stage):
                out.append(old.version)
                break
    return out
