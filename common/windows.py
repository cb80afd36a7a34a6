"""Maintenance windows: when a cell may be updated by a release that needs one. A set of
windows belongs to a cell or to an org (a cell's own set wins), in one time zone; each window is
some days of the week, a start time and a length. ``substratectl windows set`` takes the file:

    time_zone: Europe/Berlin
    windows:
      - days: [sat, sun]
        start: "02:00"
        duration_minutes: 240

Windows in a set never overlap, and none is empty; a window may run past midnight (and past
the end of the week, into Monday).
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from itertools import pairwise
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEK_MINUTES = 7 * 24 * 60


class Window(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    days: Annotated[list[Day], Field(min_length=1, max_length=7)]
    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    duration_minutes: Annotated[int, Field(gt=0, le=WEEK_MINUTES - 1)]

    def minutes(self) -> list[tuple[int, int]]:
        """Each occurrence as [start, end) minutes of the week from Monday 00:00 (end may
        pass the week's end)."""
        hour, minute = map(int, self.start.split(":"))
        out = []
        for day in sorted(set(self.days), key=DAYS.index):
            begin = DAYS.index(day) * 1440 + hour * 60 + minute
            out.append((begin, begin + self.duration_minutes))
        return out


class WindowSet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    time_zone: str
    windows: Annotated[list[Window], Field(min_length=1, max_length=28)]

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a time zone (an IANA name such as Europe/Berlin or UTC)"
            ) from None
        return value

    @model_validator(mode="after")
    def _apart(self) -> WindowSet:
        pieces: list[tuple[int, int, int]] = []  # (start, end, window index), within one week
        for i, window in enumerate(self.windows):
            for begin, end in window.minutes():
                if end <= WEEK_MINUTES:
                    pieces.append((begin, end, i))
                else:
                    pieces += [(begin, WEEK_MINUTES, i), (0, end - WEEK_MINUTES, i)]
        pieces.sort()
        for (_, end, i), (begin, _, j) in pairwise(pieces):
            if begin < end:
                a, b = sorted((i, j))
                where = f"windows.{b}" if a != b else f"windows.{a}"
                other = f"windows.{a}" if a != b else "itself (on another day)"
                raise ValueError(f"{where} overlaps {other}")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def _occurrences(self, now: datetime) -> list[tuple[datetime, datetime]]:
        """Every window's occurrences from a week before ``now`` to a week after, in UTC."""
        local = now.astimezone(self.zone)
        monday = local.date() - timedelta(days=local.weekday())
        out = []
        for window in self.windows:
            hour, minute = map(int, window.start.split(":"))
            for day in window.days:
                for week in (-1, 0, 1):
                    date = monday + timedelta(days=DAYS.index(day) + 7 * week)
                    begin = datetime.combine(date, time(hour, minute), tzinfo=self.zone)
                    # The length is real time, across a change of the clocks too.
                    start = begin.astimezone(ZoneInfo("UTC"))
                    out.append((start, start + timedelta(minutes=window.duration_minutes)))
        return sorted(out)

    def is_open(self, now: datetime) -> bool:
        return any(start <= now < end for start, end in self._occurrences(now))

    def next_open(self, now: datetime) -> datetime:
        """``now`` if a window is open, else when the next one opens."""
        if self.is_open(now):
            return now
        return min(start for start, _ in self._occurrences(now) if start > now)
