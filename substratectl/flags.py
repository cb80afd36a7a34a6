"""`substratectl flags ...`: define, inspect, evaluate and preview feature flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import times
from common.flags import Flag
from common.requests.flags import (
    Answer,
    FlagChange,
    FlagsApprove,
    FlagsCancel,
    FlagsDelete,
    FlagsEnable,
    FlagsEval,
    FlagsHistory,
    FlagsList,
    FlagsPending,
    FlagsPreview,
    FlagsSet,
    FlagsShow,
    FlagView,
    HistoryEntry,
    Preview,
)
from substratectl.context import Ctl, read_flag_file
from substratectl.output import emit_yaml, fail, fields, plural, table

AT_HELP = "make the change at this time (ISO 8601) or from now (30m, 2h), not at once"


def _set(result: FlagChange) -> str:
    if result.waits:
        return f"flag {result.key} not changed yet: the change waits for {result.waits}"
    if result.changed:
        return f"flag {result.key} {result.action}; snapshot {result.snapshot_version}"
    return f"flag {result.key} unchanged (snapshot {result.snapshot_version})"


async def set_flag(ctl: Ctl) -> int:
    flag = read_flag_file(Path(ctl.args.file))
    return await ctl.ask(FlagsSet.model_validate({"flag": flag, "at": ctl.args.at}), _set)


async def enable(ctl: Ctl) -> int:
    on = ctl.args.flags_command == "enable"
    return await ctl.ask(FlagsEnable(key=ctl.args.key, enabled=on, at=ctl.args.at), _set)


async def approve(ctl: Ctl) -> int:
    return await ctl.ask(FlagsApprove(key=ctl.args.key), _set)


async def cancel(ctl: Ctl) -> int:
    return await ctl.ask(
        FlagsCancel(key=ctl.args.key),
        lambda p: f"pending change of {p.key} (asked by {p.asked_by}) dropped",
    )


PENDING_COLUMNS = ["key", "asked_by", "asked_at", "at", "approval", "approved_by", "flips"]


async def pending(ctl: Ctl) -> int:
    return await ctl.ask(FlagsPending(), lambda changes: table(changes, PENDING_COLUMNS))


LIST_COLUMNS = [
    "key",
    "enabled",
    "default_variant",
    "rules",
    "requires_release",
    "owner",
    "description",
]


async def list_flags(ctl: Ctl) -> int:
    return await ctl.ask(FlagsList(), lambda flags: table(flags, LIST_COLUMNS))


def _flag(result: FlagView) -> str:
    """A flag as people read it: its fields, each variant and its value as JSON, each rule in
    words (-o yaml prints the file)."""
    lines = [fields(result.model_dump(mode="json", exclude={"rules", "variants"})), "variants:"]
    lines += [f"  {name}: {json.dumps(value)}" for name, value in result.variants.items()]
    lines.append("rules:" if result.rules else "rules: none (every cell gets the default)")
    for i, rule in enumerate(result.rules):
        data = rule.model_dump(mode="json", exclude_none=True)
        when = " and ".join(
            f"{c['attribute']} {c['op']} {json.dumps(c.get('values', c.get('value')))}"
            for c in data.get("when", [])
        )
        serve = data.get("serve") or json.dumps(data.get("split"))
        lines.append(f"  {i} {data.get('name', '')}: {when or 'every cell'} -> {serve}")
    return "\n".join(lines)


async def show(ctl: Ctl) -> int:
    view = await ctl.call(FlagsShow(key=ctl.args.key))
    if ctl.as_yaml:
        # The flag file itself, which flags set takes back (edit it, set it again).
        emit_yaml(Flag.model_validate(view.model_dump(exclude={"snapshot_version"})))
        return 0
    ctl.show(view, _flag)
    return 0


def _history(entries: list[HistoryEntry]) -> str:
    rows = [{**e.model_dump(), "diff": ", ".join(e.diff) or "-"} for e in entries]
    return table(rows, ["version", "at", "actor", "action", "diff"])


async def history(ctl: Ctl) -> int:
    return await ctl.ask(FlagsHistory(key=ctl.args.key), _history)


async def delete(ctl: Ctl) -> int:
    return await ctl.ask(
        FlagsDelete(key=ctl.args.key),
        lambda r: f"flag {r.key} deleted; snapshot {r.snapshot_version}",
    )


async def evaluate(ctl: Ctl) -> int:
    def answer(result: Answer) -> str:
        rule = ""
        if result.rule is not None:
            rule = f", rule {result.rule} {result.rule_name or ''}".rstrip()
        return (
            f"{result.key} for {ctl.args.cell}: {json.dumps(result.value)} "
            f"(variant {result.variant}, {result.reason}{rule})"
        )

    result = await ctl.call(FlagsEval(key=ctl.args.key, cell=ctl.args.cell))
    if result.reason == "FLAG_NOT_FOUND":
        # As `flags show` does: a key nobody defined is an error, not a default answer.
        return fail(f"no flag {ctl.args.key!r}", as_json=ctl.as_json)
    ctl.show(result, answer)
    return 0


def _preview(result: Preview) -> str:
    lines = [
        f"{result.key}: {result.flipping:,} of {plural(result.cells, 'cell')} would change"
        " (nothing is written)"
    ]
    if result.held:
        lines.append(
            f"{result.held} of the {result.cells} cells are held for their infrastructure"
            " (out of SLA): they get no application update"
        )
    if result.changes:
        rows = [c.model_dump(by_alias=True) for c in result.changes]
        lines.append(table(rows, ["stage", "org", "from", "to", "cells"]))
    return "\n".join(lines)


async def preview(ctl: Ctl) -> int:
    flag = read_flag_file(Path(ctl.args.file))
    return await ctl.ask(FlagsPreview.model_validate({"flag": flag}), _preview)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    flags = sub.add_parser("flags", help="feature flags: define, inspect, evaluate, preview")
    cmds = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    p = cmds.add_parser("set", help="create or replace a flag from a YAML or JSON file")
    p.add_argument("file")
    p.add_argument("--at", type=times.at, help=AT_HELP)
    p.set_defaults(run=set_flag)
    for name, text in (
        ("enable", "switch a flag on"),
        ("disable", "switch a flag off (the kill switch)"),
    ):
        p = cmds.add_parser(name, help=f"{text}, its rules kept")
        p.add_argument("key")
        p.add_argument("--at", type=times.at, help=AT_HELP)
        p.set_defaults(run=enable)
    p = cmds.add_parser("approve", help="make a change that waits for a second operator")
    p.add_argument("key")
    p.set_defaults(run=approve)
    p = cmds.add_parser("pending", help="changes waiting for their time or an approval")
    p.set_defaults(run=pending)
    p = cmds.add_parser("cancel", help="drop a flag's pending change")
    p.add_argument("key")
    p.set_defaults(run=cancel)
    p = cmds.add_parser("list", help="every flag")
    p.set_defaults(run=list_flags)
    p = cmds.add_parser("show", help="one flag, whole (-o yaml: the file flags set takes)")
    p.add_argument("key")
    p.set_defaults(run=show)
    p = cmds.add_parser("history", help="who changed a flag, when, and what changed")
    p.add_argument("key")
    p.set_defaults(run=history)
    p = cmds.add_parser("delete", help="delete a flag (cells answer their defaults)")
    p.add_argument("key")
    p.set_defaults(run=delete)
    p = cmds.add_parser("eval", help="the central answer for one cell")
    p.add_argument("key")
    p.add_argument("--cell", required=True)
    p.set_defaults(run=evaluate)
    p = cmds.add_parser("preview", help="which cells a flag file would flip, by stage and org")
    p.add_argument("file")
    p.set_defaults(run=preview)
