"""Every release's per-stage counts (what ``stage_counts`` computes from the whole fleet), kept
as cells change instead of computed per request.

The controller holds a copy of the fleet and learns of each change to it (a cell read again, a
desired state it wrote). For each change a :class:`Tally` takes the cell's old entry out of
every release's counts and puts its new one in: work proportional to what changed times the
number of releases, never to the fleet.

Where a cell stands depends on the time in one place only: a cell sent a release that reports
no outcome within the deadline turns from in progress to timed out. A tally counts each cell as
of a fixed rule rather than "now", so that taking an old entry out subtracts exactly what was
added: a cell is counted timed out once its deadline was seen to pass (it is then in
``expired``), in progress before. The deadlines of the cells counted in progress wait in a heap,
and :meth:`Tally.advance` moves those that passed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from common.requests.rollout import RolloutPolicy
from common.vocabulary import STAGES
from services.rollout.model.cells import BUCKET, COUNT_KEYS, CellFacts, cell_progress

# Times before any desired state was sent and after any deadline: a cell judged at the first is
# never timed out, at the second it is if it is ever going to be.
NEVER_LATE = datetime(1970, 1, 1, tzinfo=UTC)
ALWAYS_LATE = datetime(9999, 1, 1, tzinfo=UTC)

Counts = dict[str, dict[str, int]]


def empty_counts() -> Counts:
    return {stage: dict.fromkeys(COUNT_KEYS, 0) for stage in STAGES}


class Tally:
    def __init__(self, policy: RolloutPolicy) -> None:
        self.policy = policy
        self.counts: dict[str, Counts] = {}
        # Customers' deferrals: cell id -> (until, the release it runs). Few cells have one.
        self.deferred: dict[str, tuple[datetime, str | None]] = {}
        self._expired: set[tuple[str, str]] = set()
        # (deadline, version, cell id) of cells counted in progress.
        self._deadlines: list[tuple[datetime, str, str]] = []
        # The releases whose counts changed since the last ``take_changed``, and whether the
        # deferrals did.
        self._changed: set[str] = set()
        self._deferred_changed = False

    # -- what changed ---------------------------------------------------------------------------

    def reset(self, cells: Iterable[CellFacts], versions: Iterable[str], now: datetime) -> None:
        """Count every release over the whole fleet (the controller's full reload), in one
        pass over ``cells``: they may come as they are read."""
        self.counts = {version: empty_counts() for version in versions}
        self.deferred, self._expired, self._deadlines = {}, set(), []
        self._changed.update(self.counts)
        for cell in cells:
            self.update(None, cell, now)

    def add_release(self, version: str, cells: Iterable[CellFacts], now: datetime) -> None:
        """Count a release that was not counted yet over the whole fleet (once, when it is
        published or the controller first sees it)."""
        self.counts[version] = empty_counts()
        self._changed.add(version)
        for cell in cells:
            self._add(version, cell, now)

    def drop_release(self, version: str) -> None:
        self.counts.pop(version, None)
        self._changed.add(version)

    def update(self, old: CellFacts | None, new: CellFacts | None, now: datetime) -> None:
        """A cell's entry changed from ``old`` to ``new`` (None: absent)."""
        for version in self.counts:
            if old is not None:
                self._remove(version, old)
            if new is not None:
                self._add(version, new, now)
        self._defer(old, new)

    def advance(self, cells: Mapping[str, CellFacts], now: datetime) -> None:
        """Count as timed out the cells whose deadline has passed by ``now``. A deadline of a
        cell that moved on since (reported, or sent again) is dropped when it comes up: a cell
        is moved only if it is late now."""
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, version, cell_id = heapq.heappop(heap)
            cell = cells.get(cell_id)
            if cell is None or version not in self.counts or (version, cell_id) in self._expired:
                continue
            if cell_progress(cell, version, self.policy, now) == "timed_out":
                self._remove(version, cell)
                self._add(version, cell, now)

    # -- reading --------------------------------------------------------------------------------

    def take_changed(self) -> tuple[set[str], bool]:
        """The releases whose counts changed since the last call, and whether the deferrals
        did."""
        changed, self._changed = self._changed, set()
        deferred, self._deferred_changed = self._deferred_changed, False
        return changed, deferred

    # -- counting -------------------------------------------------------------------------------

    def _counted(self, version: str, cell: CellFacts) -> str | None:
        late = (version, cell.id) in self._expired
        progress = cell_progress(cell, version, self.policy, ALWAYS_LATE if late else NEVER_LATE)
        return None if progress == "decommissioned" else BUCKET[progress]

    def _remove(self, version: str, cell: CellFacts) -> None:
        bucket = self._counted(version, cell)
        self._expired.discard((version, cell.id))
        if bucket is not None:
            stage = self.counts[version][cell.stage]
            stage["total"] -= 1
            stage[bucket] -= 1
            self._changed.add(version)

    def _add(self, version: str, cell: CellFacts, now: datetime) -> None:
        progress = cell_progress(cell, version, self.policy, now)
        if progress == "decommissioned":
            return
        if progress == "timed_out":
            self._expired.add((version, cell.id))
        elif progress == "in_progress" and cell.desired_at is not None:
            deadline = self.policy.progress_deadline_seconds + (cell.desired_bake or 0.0)
            due = cell.desired_at + timedelta(seconds=deadline)
            heapq.heappush(self._deadlines, (due, version, cell.id))
        stage = self.counts[version][cell.stage]
        stage["total"] += 1
        stage[BUCKET[progress]] += 1
        self._changed.add(version)

    def _defer(self, old: CellFacts | None, new: CellFacts | None) -> None:
        was = self.deferred.pop(old.id, None) if old is not None else None
        if new is not None and new.deferred_until is not None:
            self.deferred[new.id] = (new.deferred_until, new.installed_release)
        if self.deferred.get(new.id if new is not None else "") != was:
            self._deferred_changed = True
