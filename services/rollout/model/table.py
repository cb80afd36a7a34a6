"""The controller's copy of the fleet, held in columns.

A step reads every cell, so the controller keeps a copy of the fleet between steps (see
``services/rollout/controller.py``). Held as one object per cell, the copy was the rollout
service's largest use of memory: a slotted record of 25 fields is over 200 bytes before its
id, its times and the dictionary that finds it. Here each field is one array over every cell:

- a field with few distinct values over the fleet (stage, status, org, a release, a phase) is
  a small number per cell (a byte, or two for more than 256 values), an index into that
  field's list of values;
- a field every cell has its own value of (the id, the agent's incarnation) is the value's
  UTF-8 bytes in one buffer, found by their offset;
- numbers and times are machine numbers (a time as microseconds since 1970).

Ids are found through an open-addressing table of rows, itself an array. A cell's
:class:`CellFacts` is built when it is read. A step reads the whole fleet several times (each
rollout's step, catch-up, the gauges): :meth:`CellTable.cells` builds it once and keeps what it
built until :meth:`CellTable.drop_built`. While it is kept, a put keeps the record it is
given beside the columns and a read returns the kept record, so a report during a rollout
builds no record. The controller keeps it while rollouts are under way and drops it once a
step finds nothing to do: a fleet at rest is held as the columns alone. A pass that reads the
fleet once (catch-up, the counts, the gauges) goes through :meth:`CellTable.each`, which builds
nothing to keep: a step with no rollout under way never holds a record for every cell. (At
100,000 cells, building them all raised the service's peak by 31 MB, and some of it stayed:
Python's allocator keeps an arena as long as one object in it lives.)

A row is never reused: a cell that goes is marked gone, and comes back in the same row. A full
reload starts a new table.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import fields
from datetime import UTC, datetime, timedelta

from services.rollout.model.cells import CellFacts

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NO_INT = -(2**63)
_EMPTY = -1


class _Shared:
    """A field with few distinct values: a number per cell, into the list of its values."""

    def __init__(self) -> None:
        self.values: list[str | None] = [None]
        self._number: dict[str | None, int] = {None: 0}
        # A byte a cell, widened when there are more values than it numbers.
        self.rows = array("B")

    def encode(self, value: str | None) -> int:
        number = self._number.get(value)
        if number is None:
            number = self._number[value] = len(self.values)
            self.values.append(value)
            if number == 1 << (8 * self.rows.itemsize):
                self.rows = array("H" if self.rows.typecode == "B" else "I", self.rows)
        return number


class _Own:
    """A field each cell has its own value of: its UTF-8 bytes, one cell's after another's. A
    value that changes is written anew at the end (a full reload reclaims the old bytes)."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.start = array("I")
        # The value's length in bytes, -1 for None.
        self.size = array("i")

    def encode(self, value: str | None) -> tuple[int, int]:
        if value is None:
            return 0, -1
        data = value.encode()
        start = len(self.text)
        self.text += data
        return start, len(data)

    def get(self, row: int) -> str | None:
        size = self.size[row]
        if size < 0:
            return None
        start = self.start[row]
        return self.text[start : start + size].decode()


class CellTable(Mapping[str, CellFacts]):
    """Every cell rollout knows, as columns; read and written as :class:`CellFacts`. Each
    field is named once in ``_write`` and once in ``_facts`` (written out: a loop over the
    fields cost several times as much, and a step reads every cell)."""

    def __init__(self) -> None:
        self.id, self.incarnation = _Own(), _Own()
        self.stage, self.status, self.org = _Shared(), _Shared(), _Shared()
        self.installed_release, self.pinned, self.hold_deadline = _Shared(), _Shared(), _Shared()
        self.desired_version, self.previous_version = _Shared(), _Shared()
        self.desired_for, self.report_phase, self.report_error = _Shared(), _Shared(), _Shared()
        self.report_verdict, self.report_check = _Shared(), _Shared()
        self.deferral_reason = _Shared()
        self.held = array("b")
        # Numbers: _NO_INT for None; times in microseconds since 1970; the bake NaN for None.
        self.desired_generation, self.report_generation = array("q"), array("q")
        self.desired_at, self.report_at, self.deferred_until = array("q"), array("q"), array("q")
        self.desired_bake = array("d")
        self._live = array("b")
        self._count = 0
        # Open addressing: a slot holds a row (or _EMPTY); at most half the slots are used.
        self._slots = array("i", [_EMPTY]) * 1024
        # What ``cells`` built, by row (None: gone), kept current by every put and pop.
        self._built: list[CellFacts | None] | None = None

    def _shared(self) -> list[_Shared]:
        return [self.stage, self.status, self.org, self.installed_release, self.pinned,
                self.hold_deadline, self.desired_version, self.previous_version,
                self.desired_for, self.report_phase, self.report_error, self.report_verdict,
                self.report_check, self.deferral_reason]  # fmt: skip

    def _numbers(self) -> list[array[int]]:
        return [self.desired_generation, self.report_generation, self.desired_at,
                self.report_at, self.deferred_until]  # fmt: skip

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, cell_id: str) -> CellFacts:
        row = self._find(cell_id)[1]
        if row is None or not self._live[row]:
            raise KeyError(cell_id)
        return self._read(row)

    def __iter__(self) -> Iterator[str]:
        live, ids = self._live, self.id
        return (ids.get(row) or "" for row in range(len(live)) if live[row])

    def cells(self) -> list[CellFacts]:
        """Every cell (in the order they were first put); see the module's docstring."""
        built = self._built
        if built is None:
            live, facts = self._live, self._facts
            self._built = built = [facts(row) if live[row] else None for row in range(len(live))]
        return [cell for cell in built if cell is not None]

    def each(self) -> Iterator[CellFacts]:
        """Every cell, as ``cells`` has them, for one pass: what ``cells`` built if it is kept,
        else each record built as it is reached and let go once the next is. A pass over a
        fleet at rest holds one record at a time, where ``cells`` holds a record for each."""
        built = self._built
        if built is not None:
            return (cell for cell in built if cell is not None)
        live, facts = self._live, self._facts
        return (facts(row) for row in range(len(live)) if live[row])

    def drop_built(self) -> bool:
        """Forget what ``cells`` built; whether there was any."""
        built, self._built = self._built, None
        return built is not None

    def put(self, cell: CellFacts) -> CellFacts | None:
        """Keep ``cell`` (in place of what was kept of it); what was kept before."""
        slot, row = self._find(cell.id)
        old = None
        if row is None:
            row = self._append()
            self._slots[slot] = row
            self._count += 1
        elif self._live[row]:
            old = self._read(row)
        else:
            self._count += 1
        self._write(row, cell)
        self._live[row] = 1
        if self._built is not None:
            self._built[row] = cell
        # After the write: the index is rebuilt from the ids the rows hold.
        if self._count * 2 > len(self._slots):
            self._grow()
        return old

    def pop(self, cell_id: str) -> CellFacts | None:
        """Forget the cell; what was kept of it."""
        row = self._find(cell_id)[1]
        if row is None or not self._live[row]:
            return None
        old = self._read(row)
        self._live[row] = 0
        self._count -= 1
        if self._built is not None:
            self._built[row] = None
        return old

    def nbytes(self) -> int:
        """What the columns hold, in bytes (the lists of shared values aside)."""
        arrays: list[array[int] | array[float]] = [
            *self._numbers(), self.desired_bake, self.held, self._live, self._slots,
            *(s.rows for s in self._shared()),
            *(a for own in (self.id, self.incarnation) for a in (own.start, own.size)),
        ]  # fmt: skip
        return (
            sum(a.itemsize * len(a) for a in arrays)
            + len(self.id.text)
            + len(self.incarnation.text)
        )

    # -- rows ---------------------------------------------------------------------------------

    def _find(self, cell_id: str) -> tuple[int, int | None]:
        """The slot of ``cell_id``, and its row (None: not in the table; the slot is free)."""
        slots, ids = self._slots, self.id
        mask = len(slots) - 1
        data = cell_id.encode()
        slot = hash(cell_id) & mask
        while True:
            row = slots[slot]
            if row == _EMPTY:
                return slot, None
            start = ids.start[row]
            if ids.size[row] == len(data) and ids.text[start : start + len(data)] == data:
                return slot, row
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        self._slots = slots = array("i", [_EMPTY]) * (len(self._slots) * 2)
        mask = len(slots) - 1
        for row in range(len(self._live)):
            slot = hash(self.id.get(row)) & mask
            while slots[slot] != _EMPTY:
                slot = (slot + 1) & mask
            slots[slot] = row

    def _read(self, row: int) -> CellFacts:
        """A live row's record: the one kept, or built from the columns."""
        built = self._built
        cell = built[row] if built is not None else None
        return cell if cell is not None else self._facts(row)

    def _append(self) -> int:
        """A new row, empty."""
        row = len(self._live)
        self._live.append(0)
        if self._built is not None:
            self._built.append(None)
        for shared in self._shared():
            shared.rows.append(0)
        for own in (self.id, self.incarnation):
            own.start.append(0)
            own.size.append(-1)
        for numbers in self._numbers():
            numbers.append(_NO_INT)
        self.desired_bake.append(math.nan)
        self.held.append(0)
        return row

    def _write(self, row: int, c: CellFacts) -> None:
        if self.id.size[row] < 0:  # an id never changes in its row
            self.id.start[row], self.id.size[row] = self.id.encode(c.id)
        if c.incarnation != self.incarnation.get(row):
            self.incarnation.start[row], self.incarnation.size[row] = self.incarnation.encode(
                c.incarnation
            )
        self.stage.rows[row] = self.stage.encode(c.stage)
        self.status.rows[row] = self.status.encode(c.status)
        self.org.rows[row] = self.org.encode(c.org)
        self.installed_release.rows[row] = self.installed_release.encode(c.installed_release)
        self.pinned.rows[row] = self.pinned.encode(c.pinned)
        self.held[row] = 1 if c.held else 0
        self.hold_deadline.rows[row] = self.hold_deadline.encode(c.hold_deadline)
        self.desired_version.rows[row] = self.desired_version.encode(c.desired_version)
        self.desired_generation[row] = _int(c.desired_generation)
        self.desired_at[row] = _us(c.desired_at)
        self.previous_version.rows[row] = self.previous_version.encode(c.previous_version)
        self.desired_for.rows[row] = self.desired_for.encode(c.desired_for)
        self.desired_bake[row] = math.nan if c.desired_bake is None else c.desired_bake
        self.report_generation[row] = _int(c.report_generation)
        self.report_phase.rows[row] = self.report_phase.encode(c.report_phase)
        self.report_error.rows[row] = self.report_error.encode(c.report_error)
        self.report_verdict.rows[row] = self.report_verdict.encode(c.report_verdict)
        self.report_check.rows[row] = self.report_check.encode(c.report_check)
        self.report_at[row] = _us(c.report_at)
        self.deferred_until[row] = _us(c.deferred_until)
        self.deferral_reason.rows[row] = self.deferral_reason.encode(c.deferral_reason)

    def _facts(self, row: int) -> CellFacts:
        bake = self.desired_bake[row]
        return CellFacts(
            self.id.get(row),  # type: ignore[arg-type]
            self.stage.values[self.stage.rows[row]],  # type: ignore[arg-type]
            self.status.values[self.status.rows[row]],  # type: ignore[arg-type]
            self.org.values[self.org.rows[row]],
            self.installed_release.values[self.installed_release.rows[row]],
            self.pinned.values[self.pinned.rows[row]],
            bool(self.held[row]),
            self.hold_deadline.values[self.hold_deadline.rows[row]],
            self.desired_version.values[self.desired_version.rows[row]],
            _none_or(self.desired_generation[row]),
            _time(self.desired_at[row]),
            self.previous_version.values[self.previous_version.rows[row]],
            self.desired_for.values[self.desired_for.rows[row]],
            None if math.isnan(bake) else bake,
            _none_or(self.report_generation[row]),
            self.report_phase.values[self.report_phase.rows[row]],
            self.report_error.values[self.report_error.rows[row]],
            self.report_verdict.values[self.report_verdict.rows[row]],
            self.report_check.values[self.report_check.rows[row]],
            _time(self.report_at[row]),
            self.incarnation.get(row),
            _time(self.deferred_until[row]),
            self.deferral_reason.values[self.deferral_reason.rows[row]],
        )


def _int(value: int | None) -> int:
    return _NO_INT if value is None else value


def _none_or(number: int) -> int | None:
    return None if number == _NO_INT else number


def _us(when: datetime | None) -> int:
    return _NO_INT if when is None else (when - _EPOCH) // _MICROSECOND


def _time(us: int) -> datetime | None:
    return None if us == _NO_INT else _EPOCH + timedelta(microseconds=us)


# _facts builds CellFacts by position: its fields, in their order.
assert [f.name for f in fields(CellFacts)] == [
    "id",
    "stage",
    "status",
    "org",
    "installed_release",
    "pinned",
    "held",
    "hold_deadline",
    "desired_version",
    "desired_generation",
    "desired_at",
    "previous_version",
    "desired_for",
    "desired_bake",
    "report_generation",
    "report_phase",
    "report_error",
    "report_verdict",
    "report_check",
    "report_at",
    "incarnation",
    "deferred_until",
    "deferral_reason",
], "CellTable._facts builds CellFacts by position"
