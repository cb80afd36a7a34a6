"""The flags engine: the conformance vectors through the agent's local path (a snapshot kept on
disk and read back), flag files refused naming the field, and a property test that the central
path, the agent's path and a plain reading of the rules always agree."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cell_agent.flags import LocalFlags
from common.flags import ATTRIBUTES, BUCKETS, Flag, Snapshot, bucket, naming, wire_for_reader
from common.messages import FlagsSnapshot
from common.versions import SemVer

VECTORS = json.loads((Path(__file__).parents[1] / "flags" / "vectors.json").read_text())["vectors"]
AGENT_OWN = ("id", "installed_release", "agent_version")


def local(tmp: Path, version: int, flags: list[dict[str, Any]], cell: dict[str, Any]) -> LocalFlags:
    """The agent's path: the control plane's part of the cell in the snapshot, the agent's own
    part from itself; the snapshot written to disk and read back by a fresh LocalFlags."""
    cp_part = {k: v for k, v in cell.items() if k not in AGENT_OWN and isinstance(v, str)}
    own_part = {k: v for k, v in cell.items() if k in AGENT_OWN or k not in cp_part}
    LocalFlags(tmp, lambda: own_part).apply(
        FlagsSnapshot(
            cell_id="c-1",
            issued_at=datetime.now(UTC),
            version=version,
            flags=tuple(flags),
            cell=cp_part,
        )
    )
    return LocalFlags(tmp, lambda: own_part)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_conformance_vectors_in_the_agent(vector: dict[str, Any], tmp_path: Path) -> None:
    flags = [vector["flag"]] if vector["flag"] else []
    key = vector["flag"]["key"] if vector["flag"] else "no-such-flag"
    answer = local(tmp_path, 7, flags, vector["cell"]).evaluate(key, vector.get("default"))
    got = answer.as_json()
    expected = {**vector["expected"], "key": key, "snapshot_version": 7}
    if expected.get("rule") is None:
        expected.pop("rule", None)
        expected.pop("rule_name", None)
    assert got == expected


def test_the_vectors_cover_what_the_issue_names() -> None:
    names = " ".join(v["name"] for v in VECTORS)
    for needle in ("kill switch", "missing version", "malformed", "pre-release", "first matching",
                   "0% split", "25% split", "100% split", "keeps its variant", "unknown attributes",
                   "unknown flag"):  # fmt: skip
        assert needle in names, needle


def test_a_cell_keeps_its_bucket_as_the_split_grows() -> None:
    ids = [f"cell-{i}" for i in range(2000)]

    def on(pct: float) -> set[str]:
        flag = Flag.model_validate({"key": "grow", "owner": "t", "rules": [
            {"split": {"on": pct, "off": 100 - pct}}]})  # fmt: skip
        snap = Snapshot(1, {"grow": flag})
        return {i for i in ids if snap.evaluate("grow", {"id": i}).variant == "on"}

    ten, twenty = on(10), on(20)
    assert ten < twenty
    assert 150 < len(ten) < 250 and 350 < len(twenty) < 450


def _rule(condition: dict[str, Any]) -> dict[str, Any]:
    return {"key": "k", "owner": "t", "rules": [{"when": [condition], "serve": "on"}]}


BAD_FLAGS = [
    ({"key": "Bad Key", "owner": "t"}, "key"),
    ({"key": "k"}, "owner"),
    ({"key": "k", "owner": "t", "default_variant": "maybe"},
     "default_variant: 'maybe' is not one of the variants"),
    ({"key": "k", "owner": "t", "rules": [{"serve": "nope"}]}, "rules.0: variant 'nope'"),
    ({"key": "k", "owner": "t", "rules": [{"serve": "on", "split": {"on": 100}}]},
     "exactly one of serve"),
    ({"key": "k", "owner": "t", "rules": [{"split": {"on": 30, "off": 60}}]},
     "add up to 100, not 90"),
    (_rule({"attribute": "plan", "op": "in", "values": ["x"]}), "rules.0.when.0.in.attribute"),
    (_rule({"attribute": "stage", "op": "like", "values": ["x"]}),
     "does not match any of the expected tags"),
    (_rule({"attribute": "installed_release", "op": "semver_gte", "value": "2026.11"}),
     "is not a semantic version"),
    ({"key": "k", "owner": "t", "requires_release": "latest"}, "requires_release"),
    ({"key": "k", "owner": "t", "enabeld": False}, "enabeld"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "needle"), BAD_FLAGS)
def test_bad_flags_are_refused_naming_the_field(flag: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        Flag.model_validate(flag)
    assert needle in str(err.value)


# -- the property: every path agrees with a plain reading of the rules ----------------------------


def reference(flag: dict[str, Any] | None, cell: dict[str, Any], version: int, default: Any
              ) -> dict[str, Any]:  # fmt: skip
    """The rules read as written, one step at a time, with nothing compiled or remembered."""
    import fnmatch

    def answer(variant: str | None, reason: str, rule: int | None = None) -> dict[str, Any]:
        assert flag is not None
        out = {"key": flag["key"], "value": flag["variants"][variant], "variant": variant,
               "reason": reason, "snapshot_version": version}  # fmt: skip
        if rule is not None:
            out["rule"], out["rule_name"] = rule, flag["rules"][rule].get("name")
        return out

    if flag is None:
        return {"key": "missing", "value": default, "variant": None, "reason": "FLAG_NOT_FOUND",
                "snapshot_version": version}  # fmt: skip
    if not flag["enabled"]:
        return answer(flag["default_variant"], "DISABLED")
    if flag.get("requires_release"):
        have = SemVer.parse(cell.get("installed_release"))
        if have is None or have < SemVer.parse(flag["requires_release"]):  # type: ignore[operator]
            return answer(flag["default_variant"], "VERSION_GATE")
    for i, rule in enumerate(flag["rules"]):
        holds = True
        for c in rule.get("when", []):
            v = cell.get(c["attribute"])
            if c["op"] == "in":
                holds &= v is not None and v in c["values"]
            elif c["op"] == "not_in":
                holds &= v is not None and v not in c["values"]
            elif c["op"] == "matches":
                holds &= isinstance(v, str) and any(
                    fnmatch.fnmatchcase(v, p) for p in c["patterns"]
                )
            else:
                have, bound = SemVer.parse(v), SemVer.parse(c["value"])
                ops = {"semver_eq": lambda a, b: a == b, "semver_gt": lambda a, b: a > b,
                       "semver_gte": lambda a, b: a >= b, "semver_lt": lambda a, b: a < b,
                       "semver_lte": lambda a, b: a <= b}  # fmt: skip
                holds &= have is not None and ops[c["op"]](have, bound)
        if not holds:
            continue
        if rule.get("serve") is not None:
            return answer(rule["serve"], "RULE_MATCH", i)
        b, upto = bucket(flag["key"], str(cell.get("id"))), 0
        for variant, pct in rule["split"].items():
            upto += round(pct * BUCKETS / 100)
            if b < upto:
                return answer(variant, "SPLIT", i)
        return answer(list(rule["split"])[-1], "SPLIT", i)
    return answer(flag["default_variant"], "DEFAULT")


VERSIONS = st.sampled_from(["2026.11.0", "2026.11.3", "2026.12.0-rc.1", "2026.12.0", "2027.1.1",
                            "2026.11", "latest", "1.4.0", "1.5.0-beta"])  # fmt: skip
TEXT = st.sampled_from(["staging", "saas", "dedicated", "acme", "globex", "eu-west-1",
                        "us-east-1", "acme-prod", "t-1", "t-22"])  # fmt: skip
VALID_VERSIONS = st.sampled_from(["2026.11.0", "2026.11.3", "2026.12.0-rc.1", "2026.12.0", "1.5.0"])

IN = st.fixed_dictionaries(
    {
        "attribute": st.sampled_from(ATTRIBUTES),
        "op": st.sampled_from(["in", "not_in"]),
        "values": st.lists(TEXT, min_size=1, max_size=3),
    }
)
SEMVER = st.fixed_dictionaries(
    {
        "attribute": st.sampled_from(["installed_release", "agent_version"]),
        "op": st.sampled_from(["semver_eq", "semver_gt", "semver_gte", "semver_lt", "semver_lte"]),
        "value": VALID_VERSIONS,
    }
)
MATCH = st.fixed_dictionaries(
    {
        "attribute": st.sampled_from(ATTRIBUTES),
        "op": st.just("matches"),
        "patterns": st.lists(
            st.sampled_from(["acme-*", "t-?", "*-1", "[st]*"]), min_size=1, max_size=2
        ),
    }
)
conditions = st.one_of(IN, SEMVER, MATCH)  # fmt: skip


@st.composite
def flags(draw: st.DrawFn) -> dict[str, Any]:
    variants = draw(st.sampled_from([["on", "off"], ["a", "b", "c"]]))
    rules = []
    for i in range(draw(st.integers(0, 3))):
        rule: dict[str, Any] = {"when": draw(st.lists(conditions, max_size=2))}
        if draw(st.booleans()):
            rule["name"] = f"r{i}"
        if draw(st.booleans()):
            rule["serve"] = draw(st.sampled_from(variants))
        else:
            cut = draw(st.integers(0, 100))
            rule["split"] = {variants[0]: cut, variants[1]: 100 - cut}
        rules.append(rule)
    return {
        "key": draw(st.sampled_from(["f-one", "f-two", "f.three"])), "owner": "t",
        "variants": {v: f"value-{v}" for v in variants}, "default_variant": variants[-1],
        "enabled": draw(st.booleans()), "rules": rules,
        **({"requires_release": draw(VALID_VERSIONS)} if draw(st.booleans()) else {}),
    }  # fmt: skip


cells = st.fixed_dictionaries(
    {"id": TEXT},
    optional={"stage": TEXT, "region": TEXT, "org": TEXT, "installed_release": VERSIONS,
              "agent_version": VERSIONS, "plan": TEXT},
)  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flag=flags(), cell=cells, present=st.booleans())
def test_central_and_local_evaluation_agree(
    flag: dict[str, Any], cell: dict[str, Any], present: bool, tmp_path: Path
) -> None:
    parsed = Flag.model_validate(flag)
    stored = parsed.model_dump_json()  # what the flags service keeps
    key = flag["key"] if present else "missing"
    central = Snapshot(3, {parsed.key: Flag.model_validate_json(stored)}).evaluate(
        key, cell, "dflt"
    )
    path = tmp_path / f"agent-{abs(hash(stored + json.dumps(cell, sort_keys=True)))}"
    wire = Snapshot(3, {parsed.key: parsed}).to_wire()  # what a flags-snapshot command carries
    agent = local(path, 3, wire, cell).evaluate(key, "dflt")
    expected = reference(flag if present else None, cell, 3, "dflt")
    if expected.get("rule") is None:
        expected.pop("rule", None)
    assert central.as_json() == agent.as_json() == expected


@settings(max_examples=300, deadline=None)
@given(flag=flags(), cell=cells)
def test_what_a_cell_is_sent_evaluates_as_the_whole_flag_and_names_no_one(
    flag: dict[str, Any], cell: dict[str, Any]
) -> None:
    """A cell is sent its flags with every condition on an id or org decided for it (or, when
    none names it, decided for any cell none names): no other customer's id or org, no
    description or owner, and the same answer as the whole flag."""
    flag = {**flag, "description": "for globex only", "owner": "globex's team"}
    parsed = Flag.model_validate(flag)
    whole = Snapshot(3, {parsed.key: parsed})
    reader = {"id": cell["id"], **({"org": cell["org"]} if "org" in cell else {})}
    views = [wire_for_reader(whole, reader)]
    if "org" in cell and not naming(whole.flags)(reader):
        views.append(wire_for_reader(whole, None))
    for view in views:
        (sent,) = view
        assert sent["description"] == "" and sent["owner"] == "-"
        decided = [c for rule in sent.get("rules", []) for c in rule.get("when", [])
                   if c["attribute"] in ("id", "org")]  # fmt: skip
        assert all(c == {"attribute": "id", "op": "in", "values": [""]} for c in decided)
        read = Snapshot.from_wire(3, view)
        assert (
            read.evaluate(parsed.key, cell).as_json() == whole.evaluate(parsed.key, cell).as_json()
        )
