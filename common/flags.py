"""Feature flags: the flag model and the one evaluation engine, used by the flags service (central
answers) and by the cell agent (local answers from its snapshot).

A snapshot's flags are compiled once, when the snapshot loads, into plain closures; evaluating
is then a dictionary lookup and a few calls, and every answer that does not depend on the cell
is built once at compile time and shared. Decisions that fail closed:

- a flag that is not ``enabled`` serves its default variant everywhere (the kill switch);
- ``requires_release``: a cell below it, or whose installed release is missing or not a
  semantic version, gets the default (pre-releases sort before their release);
- a condition on an attribute the cell does not have (or a version that does not parse) is
  false, whatever its operator: ``not_in`` included;
- a flag that is not in the snapshot answers the caller's default with ``FLAG_NOT_FOUND`` and
  never raises.

Splits bucket a cell by sha256 of ``<flag key>:<cell id>`` into 10,000 buckets; variants take
consecutive ranges in the order written, so a cell keeps its bucket (and its variant) as a
percentage grows, and flags bucket independently.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.versions import SemVer, SemVerText

Attribute = Literal["id", "stage", "region", "org", "installed_release", "agent_version"]
ATTRIBUTES: tuple[Attribute, ...] = get_args(Attribute)
SemverOp = Literal["semver_eq", "semver_gt", "semver_gte", "semver_lt", "semver_lte"]
Reason = Literal["DISABLED", "VERSION_GATE", "RULE_MATCH", "SPLIT", "DEFAULT", "FLAG_NOT_FOUND"]
BUCKETS = 10_000
KEY_PATTERN = r"^[a-z][a-z0-9._-]{0,63}$"


Version = SemVerText


class InCondition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    attribute: Attribute
    op: Literal["in", "not_in"]
    values: tuple[str, ...] = Field(min_length=1)


class SemverCondition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    attribute: Literal["installed_release", "agent_version"]
    op: SemverOp
    value: Version


class MatchCondition(BaseModel):
    """Glob patterns (``acme-*``, ``eu-*``): the attribute matches any of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attribute: Attribute
    op: Literal["matches"]
    patterns: tuple[str, ...] = Field(min_length=1)


Condition = Annotated[InCondition | SemverCondition | MatchCondition, Field(discriminator="op")]


class Rule(BaseModel):
    """All of ``when`` must hold (an empty ``when`` always holds); then the rule serves one
    variant, or splits cells among variants by percentage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(default=None, max_length=100)
    when: tuple[Condition, ...] = ()
    serve: str | None = None
    split: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> Rule:
        if (self.serve is None) == (self.split is None):
            raise ValueError("a rule needs exactly one of serve (a variant) or split")
        if self.split is not None:
            if not self.split:
                raise ValueError("split: name at least one variant")
            if any(p < 0 for p in self.split.values()):
                raise ValueError("split: percentages cannot be negative")
            if abs(sum(self.split.values()) - 100) > 1e-9:
                raise ValueError(
                    f"split: percentages must add up to 100, not {sum(self.split.values()):g}"
                )
            if any(abs(p * 100 - round(p * 100)) > 1e-6 for p in self.split.values()):
                raise ValueError("split: percentages have at most two decimals")
        return self


class Flag(BaseModel):
    """What ``substratectl flags set FILE`` accepts (YAML or JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: Annotated[str, Field(pattern=KEY_PATTERN)]
    description: str = Field(default="", max_length=2000)
    owner: str = Field(min_length=1, max_length=200)
    variants: dict[str, Any] = Field(default_factory=lambda: {"on": True, "off": False})
    default_variant: str = "off"
    enabled: bool = True
    requires_release: Version | None = None
    rules: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _variants_exist(self) -> Flag:
        if not self.variants:
            raise ValueError("variants: name at least one")
        known = set(self.variants)
        names = ", ".join(sorted(known))
        if self.default_variant not in known:
            raise ValueError(
                f"default_variant: {self.default_variant!r} is not one of the variants ({names})"
            )
        for i, rule in enumerate(self.rules):
            used = [rule.serve] if rule.serve is not None else list(rule.split or ())
            for variant in used:
                if variant not in known:
                    raise ValueError(
                        f"rules.{i}: variant {variant!r} is not one of the variants ({names})"
                    )
        return self


# -- answers -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evaluation:
    key: str
    value: Any
    variant: str | None
    reason: Reason
    snapshot_version: int
    rule: int | None = None
    rule_name: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "value": self.value,
            "variant": self.variant,
            "reason": self.reason,
            "snapshot_version": self.snapshot_version,
        }
        if self.rule is not None:
            out["rule"] = self.rule
            out["rule_name"] = self.rule_name
        return out


Cell = Mapping[str, Any]
Evaluator = Callable[[Cell], Evaluation]


def bucket(flag_key: str, cell_id: str) -> int:
    digest = hashlib.sha256(f"{flag_key}:{cell_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


# -- compiling ------------------------------------------------------------------------------------

# Memo tables are dropped when they grow past this: a fleet has at most this many distinct
# values of an attribute worth remembering.
MEMO_LIMIT = 200_000


def _version_test(op: SemverOp, bound: SemVer) -> Callable[[SemVer], bool]:
    return {
        "semver_eq": lambda v: v == bound,
        "semver_gt": lambda v: v > bound,
        "semver_gte": lambda v: v >= bound,
        "semver_lt": lambda v: v < bound,
        "semver_lte": lambda v: v <= bound,
    }[op]


def _memo_on(attribute: str, compute: Callable[[Any], bool]) -> Callable[[Cell], bool]:
    """A test of one attribute's value, remembered per value (versions repeat across cells)."""
    memo: dict[Any, bool] = {}

    def test(cell: Cell) -> bool:
        value = cell.get(attribute)
        known = memo.get(value)
        if known is None:
            if len(memo) > MEMO_LIMIT:
                memo.clear()
            known = memo[value] = compute(value)
        return known

    return test


def _compile_condition(c: InCondition | SemverCondition | MatchCondition) -> Callable[[Cell], bool]:
    attribute = c.attribute
    if isinstance(c, InCondition):
        values = frozenset(c.values)
        if c.op == "in":
            return lambda cell: cell.get(attribute) in values
        return lambda cell: (v := cell.get(attribute)) is not None and v not in values
    if isinstance(c, SemverCondition):
        bound = SemVer.parse(c.value)
        assert bound is not None
        passes = _version_test(c.op, bound)

        def version_ok(value: Any) -> bool:
            parsed = SemVer.parse(value) if isinstance(value, str) else None
            return parsed is not None and passes(parsed)

        return _memo_on(attribute, version_ok)
    pattern = re.compile("|".join(f"(?:{translate(p)})" for p in c.patterns))
    return _memo_on(attribute, lambda v: isinstance(v, str) and pattern.match(v) is not None)


def _all_of(tests: list[Callable[[Cell], bool]]) -> Callable[[Cell], bool]:
    if not tests:
        return lambda cell: True
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        a, b = tests
        return lambda cell: a(cell) and b(cell)
    return lambda cell: all(t(cell) for t in tests)


def _compile_split(flag: Flag, index: int, rule: Rule, version: int) -> Evaluator:
    assert rule.split is not None
    bounds: list[tuple[int, Evaluation]] = []
    upto = 0
    for variant, percent in rule.split.items():
        upto += round(percent * BUCKETS / 100)
        answer = Evaluation(
            flag.key, flag.variants[variant], variant, "SPLIT", version, index, rule.name
        )
        bounds.append((upto, answer))
    key = flag.key
    memo: dict[Any, Evaluation] = {}

    def split(cell: Cell) -> Evaluation:
        cell_id = cell.get("id")
        answer = memo.get(cell_id)
        if answer is None:
            b = bucket(key, str(cell_id))
            answer = next((a for limit, a in bounds if b < limit), bounds[-1][1])
            if len(memo) > MEMO_LIMIT:
                memo.clear()
            memo[cell_id] = answer
        return answer

    return split


def compile_flag(flag: Flag, version: int) -> Evaluator:
    """The flag as one function of a cell's attributes."""
    default = flag.variants[flag.default_variant]
    if not flag.enabled:
        disabled = Evaluation(flag.key, default, flag.default_variant, "DISABLED", version)
        return lambda cell: disabled
    fallthrough = Evaluation(flag.key, default, flag.default_variant, "DEFAULT", version)
    # Per rule: its test, and either its fixed answer or its split. The loops below are the
    # whole evaluation; they are written out (not composed of smaller calls) because a call
    # is most of what an evaluation costs.
    rules: list[tuple[Callable[[Cell], bool], Evaluation | None, Evaluator | None]] = []
    for i, rule in enumerate(flag.rules):
        when = _all_of([_compile_condition(c) for c in rule.when])
        if rule.serve is not None:
            answer = Evaluation(
                flag.key, flag.variants[rule.serve], rule.serve, "RULE_MATCH", version, i, rule.name
            )
            rules.append((when, answer, None))
        else:
            rules.append((when, None, _compile_split(flag, i, rule, version)))

    if flag.requires_release is None:

        def by_rules(cell: Cell) -> Evaluation:
            for when, answer, split in rules:
                if when(cell):
                    return answer if split is None else split(cell)  # type: ignore[return-value]
            return fallthrough

        return by_rules

    minimum = SemVer.parse(flag.requires_release)
    assert minimum is not None
    gated = Evaluation(flag.key, default, flag.default_variant, "VERSION_GATE", version)
    passes: dict[Any, bool] = {}

    def gated_by_release(cell: Cell) -> Evaluation:
        release = cell.get("installed_release")
        ok = passes.get(release)
        if ok is None:
            parsed = SemVer.parse(release) if isinstance(release, str) else None
            if len(passes) > MEMO_LIMIT:
                passes.clear()
            ok = passes[release] = parsed is not None and parsed >= minimum
        if not ok:
            return gated
        for when, answer, split in rules:
            if when(cell):
                return answer if split is None else split(cell)  # type: ignore[return-value]
        return fallthrough

    return gated_by_release


class Snapshot:
    """Every flag at one snapshot version, compiled."""

    def __init__(self, version: int, flags: Mapping[str, Flag]) -> None:
        self.version = version
        self.flags = dict(flags)
        self._compiled = {key: compile_flag(flag, version) for key, flag in self.flags.items()}

    @classmethod
    def from_wire(cls, version: int, flags: Any) -> Snapshot:
        """From a ``flags-snapshot`` command's (or a stored snapshot's) list of flag dicts."""
        parsed = [Flag.model_validate(f) for f in flags]
        return cls(version, {f.key: f for f in parsed})

    def to_wire(self) -> list[dict[str, Any]]:
        return [
            self.flags[k].model_dump(mode="json", exclude_none=True) for k in sorted(self.flags)
        ]

    def evaluate(self, key: str, cell: Cell, default: Any = None) -> Evaluation:
        compiled = self._compiled.get(key)
        if compiled is None:
            return Evaluation(key, default, None, "FLAG_NOT_FOUND", self.version)
        return compiled(cell)


EMPTY = Snapshot(0, {})


# -- what a cell may read -------------------------------------------------------------------------

# The attributes that name a customer: conditions on them are decided before a snapshot leaves
# the control plane, so no cell reads another's id or org. (Stages, regions and versions name
# no one; the agent evaluates those itself.)
NAMING: tuple[Attribute, ...] = ("id", "org")
# A rule no cell matches (no cell id is empty): what a rule that cannot apply to the reader
# becomes, so the rules keep their numbers and answers keep agreeing with central evaluation.
_NEVER = InCondition(attribute="id", op="in", values=("",))


def _naming_holds(c: InCondition | MatchCondition, cell: Mapping[str, str] | None) -> bool:
    """Whether a condition on a naming attribute holds for ``cell`` (None: a cell no
    condition names, for which ``in`` and ``matches`` fail and ``not_in`` holds)."""
    if cell is None:
        return c.op == "not_in"
    return _compile_condition(c)(cell)


def naming(flags: Mapping[str, Flag]) -> Callable[[Mapping[str, str]], bool]:
    """Whether a condition of ``flags`` names a cell: lists its id or org, or has a pattern
    that matches it. Such a cell is sent a snapshot of its own; every other cell reads the
    same one (``for_reader(flag, None)``). The conditions are compiled once, for a whole fleet."""
    listed: dict[str, set[str]] = {attribute: set() for attribute in NAMING}
    patterns: list[Callable[[Cell], bool]] = []
    for flag in flags.values():
        for rule in flag.rules:
            for c in rule.when:
                if c.attribute not in NAMING:
                    continue
                if isinstance(c, InCondition):
                    listed[c.attribute].update(c.values)
                elif isinstance(c, MatchCondition):
                    patterns.append(_compile_condition(c))

    def names(cell: Mapping[str, str]) -> bool:
        return any(cell.get(a) in values for a, values in listed.items()) or any(
            test(cell) for test in patterns
        )

    return names


def for_reader(flag: Flag, cell: Mapping[str, str] | None) -> Flag:
    """``flag`` as the cell ``cell`` (its id and org; None: a cell no condition names) may
    read it: no description or owner, every condition on an id or org decided (one that holds
    is dropped; a rule with one that fails never matches and loses its name). It evaluates
    for that cell exactly as ``flag`` does."""
    rules = []
    for rule in flag.rules:
        decided = [c for c in rule.when if c.attribute in NAMING]
        if all(_naming_holds(c, cell) for c in decided if not isinstance(c, SemverCondition)):
            when = tuple(c for c in rule.when if c.attribute not in NAMING)
            rules.append(rule.model_copy(update={"when": when}))
        else:
            rules.append(rule.model_copy(update={"when": (_NEVER,), "name": None}))
    return flag.model_copy(update={"description": "", "owner": "-", "rules": tuple(rules)})


def wire_for_reader(snapshot: Snapshot, cell: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """What a cell is sent of ``snapshot`` (see ``for_reader``)."""
    return [
        for_reader(snapshot.flags[k], cell).model_dump(mode="json", exclude_none=True)
        for k in sorted(snapshot.flags)
    ]
