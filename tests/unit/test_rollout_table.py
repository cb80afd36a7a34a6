"""The controller's copy of the fleet in columns (model.table) reads back every cell as it was
put, whatever was put, replaced or forgotten before, and what it built for a step follows the
changes made during the step; a single pass (each) reads the same, without building."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rollout.model import CellFacts
from services.rollout.model.table import CellTable

T0 = datetime(2026, 12, 1, 8, 30, 1, 250_000, tzinfo=UTC)
text = st.one_of(st.none(), st.sampled_from(["2026.1.0", "2026.2.0", "é-org", ""]))
own = st.one_of(st.none(), st.text(max_size=40))
when = st.one_of(
    st.none(), st.integers(-(10**12), 10**12).map(lambda us: T0 + timedelta(microseconds=us))
)
number = st.one_of(st.none(), st.integers(0, 2**62))
ids = st.sampled_from([f"c-{i}" for i in range(12)] + ["ünï", "a" * 100])


@st.composite
def facts(draw: st.DrawFn, cell_id: str) -> CellFacts:
    return CellFacts(
        id=cell_id,
        stage=draw(st.sampled_from(["staging", "saas", "dedicated"])),
        status=draw(st.sampled_from(["created", "online", "offline", "decommissioned"])),
        org=draw(text),
        installed_release=draw(text),
        pinned=draw(text),
        held=draw(st.booleans()),
        hold_deadline=draw(text),
        desired_version=draw(text),
        desired_generation=draw(number),
        desired_at=draw(when),
        previous_version=draw(text),
        desired_for=draw(text),
        desired_bake=draw(st.one_of(st.none(), st.floats(0, 1e6))),
        report_generation=draw(number),
        report_phase=draw(st.one_of(st.none(), st.sampled_from(["succeeded", "failed"]))),
        report_error=draw(own),
        report_verdict=draw(text),
        report_check=draw(own),
        report_at=draw(when),
        incarnation=draw(own),
        deferred_until=draw(when),
        deferral_reason=draw(own),
    )


Change = tuple[str, str, CellFacts | None]


@st.composite
def changes(draw: st.DrawFn) -> list[Change]:
    """Puts and pops of cells; "step" where a step reads the whole fleet, "drop" where one
    ends."""
    out: list[Change] = []
    for _ in range(draw(st.integers(1, 60))):
        kind, cell_id = draw(st.sampled_from(["put", "put", "pop", "step", "drop"])), draw(ids)
        out.append((kind, cell_id, draw(facts(cell_id)) if kind == "put" else None))
    return out


def by_id(cells: Iterable[CellFacts]) -> list[CellFacts]:
    return sorted(cells, key=lambda c: c.id)


@settings(max_examples=150, deadline=None)
@given(changes())
def test_the_table_reads_back_what_was_put(steps: list[Change]) -> None:
    table, model = CellTable(), dict[str, CellFacts]()
    for kind, cell_id, cell in steps:
        if kind == "put":
            assert cell is not None
            assert table.put(cell) == model.get(cell_id)
            model[cell_id] = cell
        elif kind == "pop":
            assert table.pop(cell_id) == model.pop(cell_id, None)
        elif kind == "step":
            # A pass with each reads what cells reads, built or not, and keeps nothing.
            built_before = table._built is not None
            assert by_id(table.each()) == by_id(model.values())
            assert (table._built is not None) == built_before
            assert by_id(table.cells()) == by_id(model.values())
            assert by_id(table.each()) == by_id(model.values())
        else:
            table.drop_built()
        assert len(table) == len(model)
        for known in model:
            assert table.get(known) == model[known] and known in table
    assert sorted(table) == sorted(model)
    assert by_id(table.cells()) == by_id(model.values())


def test_a_large_table_finds_every_cell_and_holds_little() -> None:
    """Past many doublings of the id index and a column's widening; the columns of 20,000
    plain cells are well under the 200 bytes a cell the rollout service may hold for the
    fleet."""
    n = 20_000
    table = CellTable()
    for i in range(n):
        table.put(CellFacts(id=f"sc-{i:06d}", stage="dedicated", status="online",
                            org=f"org-{i % 500}", installed_release="2026.1.0",
                            desired_generation=i, desired_at=T0, incarnation="b"))  # fmt: skip
    assert len(table) == n
    # Every cell is found where it was put, the one put as the index grew included (it was
    # once entered under the id it did not have yet, so it was put again as a second row).
    assert [table[f"sc-{i:06d}"].desired_generation for i in range(n)] == list(range(n))
    assert table.put(replace(table[f"sc-{512:06d}"], held=True)) is not None
    assert len(table) == n and len(table.cells()) == n
    assert table.get("sc-020000") is None
    # 500 orgs: their column widened from a byte a cell to two, every cell's org kept.
    assert table.org.rows.typecode == "H" and table.stage.rows.typecode == "B"
    assert all(table[f"sc-{i:06d}"].org == f"org-{i % 500}" for i in range(0, n, 89))
    assert table.nbytes() / n < 110
