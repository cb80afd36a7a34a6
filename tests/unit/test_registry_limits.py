"""The registry's heartbeat budget per cell."""

from __future__ import annotations

import pytest

from services.registry import limits
from services.registry.limits import PerCellLimit


def test_a_cell_gets_its_burst_then_its_rate_and_others_are_untouched() -> None:
    limit = PerCellLimit(rate=2, burst=5)
    assert [limit.allow("flooder", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    # Another cell's budget is its own.
    assert limit.allow("quiet", 0.0)
    # Half a second refills one heartbeat at 2 a second; no more.
    assert limit.allow("flooder", 0.5)
    assert not limit.allow("flooder", 0.5)
    # A long silence refills up to the burst, never past it.
    assert [limit.allow("flooder", 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_a_rate_of_zero_is_no_limit() -> None:
    limit = PerCellLimit(rate=0, burst=1)
    assert all(limit.allow("cell", 0.0) for _ in range(1000))


def test_idle_cells_are_forgotten_when_there_are_many(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "_PRUNE_AT", 3)
    limit = PerCellLimit(rate=1, burst=2)
    for cell in ("a", "b", "c"):
        limit.allow(cell, 0.0)
    limit.allow("d", 10.0)  # a, b and c have refilled since: forgotten
    assert set(limit._buckets) == {"d"}
