"""The rollout controller: the loop that carries rollouts out.

Each step loads the policy and every rollout, brings its copy of the cells up to date, lets
the pure functions of ``model.py`` decide, and writes each rollout's step in one fenced Lua
script (``store.commit``) together with the desired states and the commands and events that go
with them. Redis holds everything: a restarted or newly elected controller carries on from it,
a step that was written is not repeated (the next step sees it done) and one that was not is
decided again. Replicas all run the loop; only the lease holder steps.

The copy of the cells is the one thing kept between steps, because reading a large fleet on
every step was most of the controller's work: it is loaded whole when the controller takes
the lease (and every ``FULL_RELOAD_SECONDS`` as a safety net), and otherwise only the cells that
others changed (``rollout:dirty``: facts, outcome reports, pins) are read again. What the
controller writes itself it applies to the copy as it writes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import replace
from datetime import datetime

from common.clock import Clock
from common.crashpoints import pause_point
from common.lease import Lease
from common.memory import give_back
from common.messages import DesiredState, Message, RolloutHalted
from common.releases import Release
from common.runner import wait_any
from common.vocabulary import ACTIVE_STATES
from services.rollout import metrics
from services.rollout.model import (
    Assign,
    CellFacts,
    Rollout,
    RolloutPolicy,
    catch_up,
    failed_with_nothing_changed,
    health_for,
    required_versions,
    step,
    superseded,
)
from services.rollout.model.table import CellTable
from services.rollout.model.tally import Tally
from services.rollout.model.windows import Windows
from services.rollout.store import FenceLost, RolloutStore, Stale

log = logging.getLogger(__name__)

FULL_RELOAD_SECONDS = 60.0


class Controller:
    def __init__(
        self, store: RolloutStore, clock: Clock, lease: Lease, *, tick_seconds: float = 1.0
    ) -> None:
        self.store = store
        self.clock = clock
        self.lease = lease
        self.tick_seconds = tick_seconds
        self._wake = asyncio.Event()
        # Outcomes reported since the last step began, and how many the first wave in
        # progress to be done waits for (0: no wave waits on outcomes).
        self._outcomes = 0
        self._awaiting = 0
        self._cells: CellTable | None = None
        self._cells_fence: str | None = None
        self._loaded_at = 0.0
        # The policy and rollouts of the last step, if it had nothing to do: the same step
        # over an unchanged fleet would have nothing to do either.
        # (policy, rollouts, windows by cell, windows by org)
        self._quiet: tuple[object, ...] | None = None
        # Registered cells by stage and release, for the gauges: counted over the whole copy
        # by a step's full pass, then kept as cells change (None: to be counted).
        self._release_counts: dict[tuple[str, str], int] | None = None
        # Every release's counts, kept with the copy of the cells (None: to be counted anew
        # over the whole copy), and written for the views.
        self._tally: Tally | None = None
        self._tally_whole = False

    def wake(self) -> None:
        """Step soon: an operator changed something a step depends on (a release, a policy,
        a pin). Changes in the fleet (a cell registered, back online, its hold lifted) wait
        for the tick: in a registration storm a step on each, over the whole fleet, took as
        much CPU as the registry spent registering the cells."""
        self._wake.set()

    @property
    def woken(self) -> bool:
        """Whether a step is due before the next tick."""
        return self._wake.is_set()

    def outcome_reported(self, *, failed: bool) -> None:
        """A cell reported how its upgrade ended. A failure may halt a wave: step soon. A
        success only matters once the waves in progress may be done, that is once as many
        outcomes came in as their cells still waited for; until then, or with no wave waiting
        (a first install, a pin), the tick looks. (Over a large fleet, a step on every report
        held a core half busy for the whole rollout, taken from the broker that carries it.)
        Counting any outcome, of any cell, can only make the step come early, never late."""
        self._outcomes += 1
        if failed or self._wave_may_be_done():
            self._wake.set()

    def _wave_may_be_done(self) -> bool:
        return 0 < self._awaiting <= self._outcomes

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            self._outcomes = 0
            started = self.clock.monotonic()
            try:
                if await self.tick():
                    metrics.STEP_DURATION.observe(self.clock.monotonic() - started)
                # While rollouts are under way a step reads the whole fleet each time: what it
                # built is kept, and each change puts its record in it. A fleet at rest is held
                # as the columns alone.
                at_rest = self._quiet is not None
                if at_rest and self._cells is not None and self._cells.drop_built():
                    give_back()
            except FenceLost:
                self._cells = None
                metrics.FENCE_LOST.inc()
                metrics.LEADER.set(0)
                log.warning("controller lease lost mid-step; another replica leads now")
            except Exception:
                log.exception("controller step failed; retrying")
            # Over a large fleet a step is mostly computing, which holds the event loop; woken
            # by every report, steps would follow each other and starve the outbox relay and
            # the consumers of this process. Resting as long as the step took leaves them at
            # least half of it.
            await wait_any(stop, timeout=self.clock.monotonic() - started)
            await wait_any(stop, self._wake, timeout=self.tick_seconds)
        with suppress(Exception):
            await self.lease.release()

    async def tick(self) -> bool:
        """One step over every rollout; False if another replica holds the lease."""
        fence = await self.lease.hold()
        metrics.LEADER.set(fence is not None)
        if fence is None:
            self._cells = None
            self._awaiting = 0
            return False
        policy = await self.store.policy()
        rollouts = {r.version: r for r in await self.store.rollouts()}
        windows = await self.store.windows(policy, list(rollouts.values()))
        now = self.clock.now()
        by_id, changed = await self._load_cells(fence, now)
        # Work over the whole fleet runs in a worker thread, here and below: the event loop
        # keeps answering requests and taking reports meanwhile (the interpreter passes between
        # the two every few milliseconds), where a step over 100,000 cells held it for seconds.
        await asyncio.to_thread(self._count, policy, rollouts, now)
        # The counts go out before anything decided on them: a view that shows a rollout's
        # new state (halted, say) shows at least the counts it was decided on.
        await self._write_tally(fence, now)
        quiet = (policy, rollouts, windows.by_cell, windows.by_org)
        if changed == [] and self._quiet == quiet:
            # Between rollouts a fleet at rest changes nothing from one tick to the next, and
            # over a large fleet catch_up and the gauges would cost a step's time every tick.
            return True
        # After a step that had nothing to do, with only cells changed since, what a step
        # would do is for those cells alone: no rollout is under way, no cell waits for a
        # retry or a window, and the rest would still have nothing to do.
        only = changed if self._quiet == quiet else None
        self._quiet = None
        # Whether this step has to be taken again on the next tick with nothing changed: a
        # rollout under way depends on the time (soak ends, deadlines), a write on itself.
        busy = False

        if await self._supersede(fence, rollouts, policy, now):
            busy = True

        required = required_versions(list(rollouts.values()))
        awaiting = []
        for r in sorted(rollouts.values(), key=lambda r: r.semver):
            if r.state not in ACTIVE_STATES and not (r.state == "aborted" and not r.reverted):
                continue
            busy = True
            cells = await asyncio.to_thread(by_id.cells)
            decision = await asyncio.to_thread(
                step, r, cells, policy, now, required, windows=windows
            )
            if decision.awaiting:
                awaiting.append(decision.awaiting)
            if decision.rollout == r and not decision.changed:
                continue
            written = await self._write(
                fence,
                r,
                decision.rollout,
                assign=decision.assign,
                events=decision.events,
                now=now,
                policy=policy,
            )
            if written is None:
                continue
            rollouts[r.version] = written
            for event in decision.events:
                if isinstance(event, RolloutHalted):
                    metrics.HALTS.labels(event.stage).inc()
                    log.warning("rollout %s halted: %s", event.version, event.reason)

        retry, counts = await self._catch_up(
            fence, by_id, rollouts=rollouts, policy=policy, now=now, required=required,
            windows=windows, only=only,
        )  # fmt: skip
        busy = busy or retry
        metrics.observe(list(rollouts.values()), counts)
        if windows.withheld:
            busy = True  # a window that opens sends what it held back
        if not busy:
            self._quiet = (policy, rollouts, windows.by_cell, windows.by_org)
        # The first wave that can be done decides.
        self._awaiting = min(awaiting, default=0)
        if self._wave_may_be_done():
            self._wake.set()  # those that came in during this step may already finish it
        await self._write_tally(fence, now)
        return True

    async def _catch_up(
        self,
        fence: str,
        by_id: CellTable,
        *,
        rollouts: dict[str, Rollout],
        policy: RolloutPolicy,
        now: datetime,
        required: tuple[str, ...],
        windows: Windows,
        only: list[str] | None = None,
    ) -> tuple[bool, dict[tuple[str, str], int]]:
        """Send cells that are behind what their stage has (a first install, a return); whether
        the next step must look again (a failed install is retried after a while), and the
        cells by stage and release for the gauges (what is sent here changes neither). With
        ``only``, those cells alone are looked at, and the gauges' counts are those kept."""
        kept = self._release_counts
        cells: Iterable[CellFacts]
        if only is not None and kept is not None:
            cells, counts = [c for c in map(by_id.get, only) if c is not None], kept
        else:
            cells, counts = by_id.each(), {}

        def catching_up() -> tuple[list[Assign], bool]:
            retrying = False

            def watched() -> Iterator[CellFacts]:
                # One pass for the three questions (see CellTable.each).
                nonlocal retrying
                for cell in cells:
                    retrying = retrying or failed_with_nothing_changed(cell)
                    if counts is not kept:
                        metrics.count_release(counts, cell)
                    yield cell

            extra = catch_up(
                watched(),
                list(rollouts.values()),
                now,
                policy.retry_failed_seconds,
                required,
                windows=windows,
            )
            return extra, retrying

        extra, retrying = await asyncio.to_thread(catching_up)
        self._release_counts = counts
        if extra or retrying:
            await self._write(fence, None, None, assign=extra, events=[], now=now, policy=policy)
        return bool(extra or retrying), counts

    async def _supersede(
        self, fence: str, rollouts: dict[str, Rollout], policy: RolloutPolicy, now: datetime
    ) -> bool:
        """Stop the rollouts a newer release supersedes; whether there were any."""
        versions = superseded(list(rollouts.values()))
        for version in versions:
            r = rollouts[version]
            new = r.model_copy(update={"state": "superseded", "updated_at": now})
            rollouts[version] = (
                await self._write(fence, r, new, assign=[], events=[], now=now, policy=policy) or r
            )
            log.info("rollout %s superseded by a newer release", version)
        return bool(versions)

    def _count(self, policy: RolloutPolicy, rollouts: dict[str, Rollout], now: datetime) -> None:
        """Bring the counts up to the policy and releases of this step (the cells' changes
        were counted as they were read)."""
        assert self._cells is not None
        tally = self._tally
        if tally is None or tally.policy != policy:
            self._tally = tally = Tally(policy)
            tally.reset(self._cells.each(), rollouts, now)
            self._tally_whole = True
            return
        for version in rollouts.keys() - tally.counts.keys():
            tally.add_release(version, self._cells.each(), now)
        for version in tally.counts.keys() - rollouts.keys():
            tally.drop_release(version)
        tally.advance(self._cells, now)

    async def _write_tally(self, fence: str, now: datetime) -> None:
        tally = self._tally
        if tally is None:
            return
        changed, deferred_changed = tally.take_changed()
        if not (changed or deferred_changed or self._tally_whole):
            return
        whole, self._tally_whole = self._tally_whole, False
        await self.store.write_tally(
            fence,
            now,
            {v: tally.counts.get(v) for v in (tally.counts if whole else changed)},
            tally.deferred if whole or deferred_changed else None,
            whole=whole,
        )

    async def _write(
        self,
        fence: str,
        old: Rollout | None,
        new: Rollout | None,
        *,
        assign: list[Assign],
        events: Sequence[Message],
        now: datetime,
        policy: RolloutPolicy,
    ) -> Rollout | None:
        """Write a step; None if an operator changed the rollout meanwhile (the next step
        decides again from what they wrote)."""
        generations = await self.store.generations(len(assign)) if assign else []
        releases = {v: await self.store.release(v) for v in {a.version for a in assign}}
        commands, bakes = await asyncio.to_thread(
            self._commands, assign, generations, releases, policy, now
        )
        pause_point("controller.before-commit", "assign" if assign else "")
        try:
            written = await self.store.commit(
                fence,
                rollout=new,
                expected_rev=old.rev if old is not None else None,
                assign=list(zip(assign, generations, strict=True)),
                at=now,
                messages=[*events, *commands],
                bakes=bakes,
            )
        except Stale:
            return None
        await asyncio.to_thread(self._apply, assign, generations, now, bakes)
        metrics.ASSIGNED.inc(len(assign))
        for a, g in zip(assign, generations, strict=True):
            log.info(
                "cell %s: desired state %s (generation %d)", a.cell_id, a.version or "nothing", g
            )
        return written

    def _commands(
        self,
        assign: list[Assign],
        generations: list[int],
        releases: dict[str | None, Release | None],
        policy: RolloutPolicy,
        now: datetime,
    ) -> tuple[list[Message], dict[str, float | None]]:
        """The desired states that carry ``assign``, and the bake each asks for."""
        commands: list[Message] = []
        bakes: dict[str, float | None] = {}
        for a, g in zip(assign, generations, strict=True):
            release = releases[a.version]
            cell = self._cells.get(a.cell_id) if self._cells is not None else None
            health = health_for(release, policy, cell.stage) if cell is not None else None
            bakes[a.cell_id] = health.bake_seconds if health is not None else None
            commands.append(
                DesiredState(
                    cell_id=a.cell_id, issued_at=now, generation=g, release=release, health=health
                )
            )
        return commands, bakes

    async def _load_cells(self, fence: str, now: datetime) -> tuple[CellTable, list[str] | None]:
        """The copy of the cells, and the ids of those read again (changed or gone), None
        after a full load. What changed is counted as it comes in; a full load is counted
        anew."""
        monotonic = self.clock.monotonic()
        stale = monotonic - self._loaded_at > FULL_RELOAD_SECONDS
        if self._cells is None or fence != self._cells_fence or stale:
            # Changes after this are in the dirty set again, so none is missed. The old copy
            # goes first: two at once was the service's largest use of memory.
            await self.store.forget_changes()
            self._cells = self._tally = None
            self._cells = await self.store.table()
            give_back()  # what the load's chunks took, the columns aside
            self._cells_fence, self._loaded_at = fence, monotonic
            self._tally = self._release_counts = None
            return self._cells, None
        changed, gone = await self.store.changed_cells()

        def replace_all() -> None:
            for cell in changed:
                self._replace(cell.id, cell, now)
            for cell_id in gone:
                self._replace(cell_id, None, now)

        if changed or gone:
            await asyncio.to_thread(replace_all)
        return self._cells, [cell.id for cell in changed] + gone

    def _replace(self, cell_id: str, new: CellFacts | None, now: datetime) -> None:
        """A cell's entry in the copy, and in the counts."""
        assert self._cells is not None
        old = self._cells.put(new) if new is not None else self._cells.pop(cell_id)
        if self._tally is not None:
            self._tally.update(old, new, now)
        counts = self._release_counts
        if counts is not None:
            if old is not None:
                metrics.count_release(counts, old, -1)
            if new is not None:
                metrics.count_release(counts, new)

    def _apply(
        self,
        assign: list[Assign],
        generations: list[int],
        now: datetime,
        bakes: dict[str, float | None],
    ) -> None:
        """What was just written, into the copy of the cells."""
        if self._cells is None:
            return
        for a, generation in zip(assign, generations, strict=True):
            cell = self._cells.get(a.cell_id)
            if cell is not None:
                self._replace(
                    a.cell_id,
                    replace(
                        cell,
                        desired_version=a.version,
                        desired_generation=generation,
                        desired_at=now,
                        previous_version=a.previous,
                        desired_bake=bakes.get(a.cell_id),
                        desired_for=a.path_to,
                    ),
                    now,
                )
