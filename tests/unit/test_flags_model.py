"""The flags service's own decisions (services/flags/model.py): a preview of a change over the
fleet, whether a sync needs a snapshot, and what a snapshot tells a cell about itself."""

from __future__ import annotations

from collections import Counter

from hypothesis import example, given, settings
from hypothesis import strategies as st

from common.flags import Flag, Snapshot
from common.fleet import FleetCell, Group, grouped
from common.vocabulary import CellStatus, ComplianceState, Stage
from services.flags import model

OFF = Flag(key="new-editor", owner="team")
STAGING_ON = Flag.model_validate(
    {
        "key": "new-editor",
        "owner": "team",
        "rules": [
            {"when": [{"attribute": "stage", "op": "in", "values": ["staging"]}], "serve": "on"}
        ],
    }
)


def cell(
    cell_id: str,
    stage: Stage,
    org: str,
    status: CellStatus = "online",
    compliance: ComplianceState | None = None,
) -> FleetCell:
    return FleetCell(
        cell_id, stage=stage, org=org, region="eu-west-1", status=status, compliance=compliance
    )


def targets(cells: list[FleetCell]) -> list[Group]:
    return grouped(c.target() for c in cells)


def test_a_preview_counts_the_cells_that_flip_by_stage_and_org() -> None:
    current = Snapshot(1, {"new-editor": OFF})
    cells = [
        cell("s-1", "staging", "acme"),
        cell("s-2", "staging", "globex"),
        cell("d-1", "dedicated", "acme"),
    ]
    preview = model.preview(
        "new-editor", current, model.proposed(current, STAGING_ON), targets(cells)
    )
    assert (preview.cells, preview.flipping, preview.held) == (3, 2, 0)
    assert preview.by_stage == {"staging": {"off -> on": 2}}
    assert preview.by_org == {"acme": {"off -> on": 1}, "globex": {"off -> on": 1}}
    assert [(f.stage, f.org, f.from_, f.to, f.cells) for f in preview.changes] == [
        ("staging", "acme", "off", "on", 1),
        ("staging", "globex", "off", "on", 1),
    ]


def test_a_preview_leaves_decommissioned_cells_out_and_counts_held_ones() -> None:
    current = Snapshot(1, {"new-editor": OFF})
    cells = [
        cell("gone", "staging", "acme", status="decommissioned"),
        cell("held", "staging", "acme", compliance="out_of_sla"),
    ]
    preview = model.preview(
        "new-editor", current, model.proposed(current, STAGING_ON), targets(cells)
    )
    assert (preview.cells, preview.flipping, preview.held) == (1, 1, 1)


SPLIT = Flag.model_validate({
    "key": "new-editor", "owner": "team", "variants": {"on": True, "off": False},
    "default_variant": "off",
    "rules": [
        {"when": [{"attribute": "id", "op": "in", "values": ["c-3", "c-8"]}], "serve": "on"},
        {"when": [{"attribute": "stage", "op": "in", "values": ["staging"]}], "serve": "on"},
        {"when": [{"attribute": "region", "op": "in", "values": ["eu-west-1"]}],
         "split": {"on": 30, "off": 70}},
    ],
})  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["staging", "saas", "dedicated"]),
            st.sampled_from(["eu-west-1", "us-east-1"]),
            st.sampled_from(["acme", "globex"]),
            st.sampled_from(["online", "offline", "decommissioned"]),
        ),
        max_size=40,
    ),
    before=st.sampled_from([None, OFF, STAGING_ON, SPLIT]),
    after=st.sampled_from([OFF, STAGING_ON, SPLIT]),
)
@example(rows=[("dedicated", "eu-west-1", "acme", "online")] * 40, before=OFF, after=SPLIT)
def test_a_preview_reuses_only_answers_that_did_not_read_the_cell_s_id(
    rows: list[tuple[Stage, str, str, CellStatus]], before: Flag | None, after: Flag
) -> None:
    """Answers are reused across cells that differ only in their id when they did not read it;
    a split or a rule on ids reads it. The preview is the cell-by-cell one either way."""
    cells = [
        FleetCell(f"c-{i}", stage=stage, org=org, region=region, status=status)
        for i, (stage, region, org, status) in enumerate(rows)
    ]
    current = Snapshot(1, {"new-editor": before} if before else {})
    proposed = model.proposed(current, after)
    flips: Counter[tuple[str, str, str, str]] = Counter()
    for c in cells:
        if c.status != "decommissioned":
            was = current.evaluate("new-editor", c.attributes()).variant or "(none)"
            becomes = proposed.evaluate("new-editor", c.attributes()).variant or "(none)"
            if was != becomes:
                flips[(c.stage or "-", c.org or "-", was, becomes)] += 1
    preview = model.preview("new-editor", current, proposed, targets(cells))
    assert {(f.stage, f.org, f.from_, f.to): f.cells for f in preview.changes} == dict(flips)


def test_a_new_flag_flips_from_no_variant() -> None:
    current = Snapshot(4, {})
    after = model.proposed(current, STAGING_ON)
    assert after.version == 5
    preview = model.preview("new-editor", current, after, targets([cell("s-1", "staging", "acme")]))
    assert preview.by_stage == {"staging": {"(none) -> on": 1}}


def test_a_cell_behind_the_current_snapshot_or_without_one_needs_it() -> None:
    current = Snapshot(7, {})
    assert model.needs_snapshot(None, current)
    assert model.needs_snapshot(6, current)
    assert not model.needs_snapshot(7, current)
    assert not model.needs_snapshot(8, current)


def test_a_snapshot_tells_a_cell_only_what_it_cannot_know_itself() -> None:
    known = FleetCell("c-1", stage="saas", region="eu-west-1", org="acme", installed_release="1")
    assert model.cell_attributes(known) == {"stage": "saas", "region": "eu-west-1", "org": "acme"}
    assert model.cell_attributes(FleetCell("c-2")) == {}


def test_a_summary_names_what_the_list_shows() -> None:
    summary = model.summary(STAGING_ON)
    assert (summary.key, summary.owner, summary.rules, summary.enabled) == (
        "new-editor",
        "team",
        1,
        True,
    )
