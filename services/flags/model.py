"""The flags service's decisions, pure: what a change previews over the fleet, whether a sync
needs a snapshot, and what a snapshot tells a cell about itself. The flag engine itself (what
a flag evaluates to) is common/flags.py, shared with the agent."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from common.flags import Flag, Snapshot
from common.fleet import ATTRIBUTES, FleetCell, Group
from common.requests.flags import FlagSummary, Flip, Preview

# Where the id (first), status, stage and org are in a target's values.
STAGE, ORG, STATUS = (ATTRIBUTES.index(name) for name in ("stage", "org", "status"))
assert ATTRIBUTES[0] == "id"


def _answers(
    key: str, current: Snapshot, proposed: Snapshot, group: Group
) -> list[tuple[tuple[str | None, str | None], int]]:
    """The group's answers before and after, and how many of its cells give each. A side whose
    answer for the first cell did not read its id gives every cell of the group that answer;
    only a side that read it (a split, a rule on ids) is evaluated cell by cell."""
    first = dict(zip(ATTRIBUTES, (group.ids[0], *group.values), strict=True))
    before, before_reads_id = _evaluated(current, key, first)
    after, after_reads_id = _evaluated(proposed, key, first)
    if not (before_reads_id or after_reads_id):
        return [((before, after), len(group.ids))]
    answers: Counter[tuple[str | None, str | None]] = Counter({(before, after): 1})
    attributes = dict(first)  # one mapping, its id changed from cell to cell
    for cell_id in group.ids[1:]:
        attributes["id"] = cell_id
        if before_reads_id:
            before = current.evaluate(key, attributes).variant
        if after_reads_id:
            after = proposed.evaluate(key, attributes).variant
        answers[(before, after)] += 1
    return list(answers.items())


def _evaluated(
    snapshot: Snapshot, key: str, cell: dict[str, str | None]
) -> tuple[str | None, bool]:
    """The flag's variant for ``cell``, and whether deciding it read the cell's id."""
    watched = _Attributes(cell)
    watched.id_read = False
    return snapshot.evaluate(key, watched).variant, watched.id_read


class _Attributes(dict[str, str | None]):
    """A cell's attributes that note whether its id was read: an answer that did not read
    the id is every cell's with the same other attributes."""

    __slots__ = ("id_read",)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        if key == "id":
            self.id_read = True
        return dict.get(self, key, default)


def preview(key: str, current: Snapshot, proposed: Snapshot, groups: Iterable[Group]) -> Preview:
    """Which cells would flip, and how, if ``proposed`` replaced ``current``: counts of
    (stage, org, from variant, to variant) for every cell whose variant changes. ``groups``:
    the fleet's cells, grouped with those alike in all but their ids (FleetView.groups).

    An answer that did not read the cell's id (no split reached, no rule on ids) is every
    cell's of its group: a fleet of 100,000 costs about as many evaluations as it has kinds of
    cell, and cells one at a time only where an answer depends on the id."""
    flips: Counter[tuple[str, str, str, str]] = Counter()
    considered = held = 0
    for group in groups:
        if group.values[STATUS - 1] == "decommissioned":
            continue
        considered += len(group.ids)
        held += len(group.ids) if group.held else 0
        stage, org = group.values[STAGE - 1] or "-", group.values[ORG - 1] or "-"
        for answers, n in _answers(key, current, proposed, group):
            before, after = answers
            if before != after:
                flips[(stage, org, before or "(none)", after or "(none)")] += n
    by_stage: dict[str, Counter[str]] = {}
    by_org: dict[str, Counter[str]] = {}
    for (stage, org, was, becomes), n in flips.items():
        by_stage.setdefault(stage, Counter())[f"{was} -> {becomes}"] += n
        by_org.setdefault(org, Counter())[f"{was} -> {becomes}"] += n
    return Preview(
        key=key,
        cells=considered,
        flipping=sum(flips.values()),
        held=held,
        by_stage={s: dict(c) for s, c in sorted(by_stage.items())},
        by_org={o: dict(c) for o, c in sorted(by_org.items())},
        changes=[
            Flip(stage=s, org=o, from_=b, to=a, cells=n)
            for (s, o, b, a), n in sorted(flips.items())
        ],
    )


def proposed(current: Snapshot, flag: Flag) -> Snapshot:
    """The snapshot ``flags set`` of ``flag`` would make."""
    return Snapshot(current.version + 1, {**current.flags, flag.key: flag})


def needs_snapshot(held: int | None, current: Snapshot) -> bool:
    """Whether a cell that holds snapshot ``held`` (None: none yet) is behind ``current``: a
    change made while it was offline reaches it with the answer to its sync."""
    return held is None or held < current.version


def reader(cell_id: str, cell: FleetCell) -> dict[str, str]:
    """What decides which flags' conditions name a cell, and how they evaluate for it."""
    return {"id": cell_id, **({"org": cell.org} if cell.org else {})}


def cell_attributes(cell: FleetCell) -> dict[str, str]:
    """What a cell's agent cannot know by itself and evaluates rules with: its stage, region
    and org as the control plane has them (it adds its own id, release and agent version)."""
    return {k: v for k in ("stage", "region", "org") if (v := getattr(cell, k))}


def summary(flag: Flag) -> FlagSummary:
    return FlagSummary(
        key=flag.key,
        owner=flag.owner,
        enabled=flag.enabled,
        default_variant=flag.default_variant,
        rules=len(flag.rules),
        requires_release=flag.requires_release,
        description=flag.description,
    )
