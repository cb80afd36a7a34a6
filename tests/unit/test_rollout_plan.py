"""The rollout plan: stages, dedicated waves, and who is skipped and why."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.rollout.model import CellFacts, WavePolicy, plan, split_waves

V = "2026.11.3"


def cell(i: int, stage: str = "dedicated", **kw: str | bool | None) -> CellFacts:
    return CellFacts(**{"id": f"c{i:03d}", "stage": stage, "status": "online", **kw})  # type: ignore[arg-type]


def test_default_waves_are_a_canary_then_10_50_100_percent_of_the_rest() -> None:
    ids = [f"c{i:03d}" for i in range(41)]
    waves = split_waves(ids, V, WavePolicy())
    assert [len(w) for w in waves] == [1, 4, 16, 20]
    assert sorted(c for w in waves for c in w) == ids


def test_the_canary_is_stable_for_a_release_and_varies_between_releases() -> None:
    ids = [f"c{i:03d}" for i in range(50)]
    assert split_waves(ids, V, WavePolicy()) == split_waves(list(reversed(ids)), V, WavePolicy())
    canaries = {split_waves(ids, f"2026.11.{n}", WavePolicy())[0][0] for n in range(20)}
    assert len(canaries) > 1


@given(st.integers(0, 300), st.integers(0, 3))
def test_every_cell_is_in_exactly_one_wave(n: int, canary: int) -> None:
    ids = [f"c{i:03d}" for i in range(n)]
    waves = split_waves(ids, V, WavePolicy(canary=canary))
    flat = [c for w in waves for c in w]
    assert sorted(flat) == ids and all(waves)
    if n > canary > 0:
        assert len(waves[0]) == canary


def test_stages_and_skips() -> None:
    cells = [
        cell(1, "staging"), cell(2, "saas"), cell(3), cell(4),
        cell(5, status="offline"), cell(6, status="decommissioned"), cell(7, status="created"),
        cell(8, pinned="2026.10.1"), cell(9, held=True), cell(10, installed_release="2026.12.0"),
        cell(11, installed_release="2026.11.3"), cell(12, installed_release="2026.10.9"),
    ]  # fmt: skip
    result = plan(V, cells, WavePolicy())
    assert result.stages["staging"] == [["c001"]]
    assert result.stages["saas"] == [["c002"]]
    assert sorted(c for w in result.stages["dedicated"] for c in w) == ["c003", "c004", "c012"]
    assert result.skipped == {
        "c005": "offline", "c006": "decommissioned", "c007": "not_registered",
        "c008": "pinned", "c009": "held", "c010": "up_to_date", "c011": "up_to_date",
    }  # fmt: skip


def test_an_empty_stage_has_no_waves() -> None:
    assert plan(V, [cell(1)], WavePolicy()).stages["staging"] == []


@pytest.mark.parametrize("fractions", [(), (0.5,), (0.5, 0.2, 1.0), (0.0, 1.0), (1.0, 1.0)])
def test_wave_fractions_must_grow_to_every_cell(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValidationError, match="fractions"):
        WavePolicy(fractions=fractions)
