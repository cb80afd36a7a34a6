"""`substratectl flags ...`: define, inspect, evaluate and preview feature flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.requests.flags import (
    FlagsDelete,
    FlagsEval,
    FlagsHistory,
    FlagsList,
    FlagsPreview,
    FlagsSet,
    FlagsShow,
)
from substratectl.context import Ctl, read_flag_file
from substratectl.output import emit_json, fields, table


async def set_flag(ctl: Ctl) -> int:
    flag = read_flag_file(Path(ctl.args.file))
    result = await ctl.call(FlagsSet.model_validate({"flag": flag}))
    if ctl.as_json:
        emit_json(result)
    elif result.changed:
        print(f"flag {result.key} {result.action}; snapshot {result.snapshot_version}")
    else:
        print(f"flag {result.key} unchanged (snapshot {result.snapshot_version})")
    return 0


async def list_flags(ctl: Ctl) -> int:
    result = await ctl.call(FlagsList())
    if ctl.as_json:
        emit_json(result)
    else:
        print(table(result, ["key", "enabled", "default_variant", "rules", "requires_release",
                             "owner", "description"]))  # fmt: skip
    return 0


async def show(ctl: Ctl) -> int:
    result = await ctl.call(FlagsShow(key=ctl.args.key))
    if ctl.as_json:
        emit_json(result)
    else:
        print(fields(result.model_dump(mode="json", exclude={"rules", "variants"})))
        print(f"variants: {result.variants}")
        for i, rule in enumerate(result.rules):
            print(f"rule {i}: {rule.model_dump(mode='json')}")
    return 0


async def history(ctl: Ctl) -> int:
    result = await ctl.call(FlagsHistory(key=ctl.args.key))
    if ctl.as_json:
        emit_json(result)
    else:
        rows = [{**e.model_dump(), "diff": ", ".join(e.diff) or "-"} for e in result]
        print(table(rows, ["version", "at", "actor", "action", "diff"]))
    return 0


async def delete(ctl: Ctl) -> int:
    result = await ctl.call(FlagsDelete(key=ctl.args.key))
    if ctl.as_json:
        emit_json(result)
    else:
        print(f"flag {result.key} deleted; snapshot {result.snapshot_version}")
    return 0


async def evaluate(ctl: Ctl) -> int:
    result = await ctl.call(FlagsEval(key=ctl.args.key, cell=ctl.args.cell))
    if ctl.as_json:
        emit_json(result)
    else:
        rule = f" (rule {result.rule})" if result.rule is not None else ""
        print(f"{result.key} for {ctl.args.cell}: {result.value!r} "
              f"[{result.variant}, {result.reason}{rule}]")  # fmt: skip
    return 0


async def preview(ctl: Ctl) -> int:
    flag = read_flag_file(Path(ctl.args.file))
    result = await ctl.call(FlagsPreview.model_validate({"flag": flag}))
    if ctl.as_json:
        emit_json(result)
        return 0
    print(f"{result.key}: {result.flipping} of {result.cells} cells would change "
          "(nothing is written)")  # fmt: skip
    if result.held:
        print(f"{result.held} of the {result.cells} cells are held for their infrastructure"
              " (out of SLA): they get no application update")  # fmt: skip
    if result.changes:
        rows = [c.model_dump(by_alias=True) for c in result.changes]
        print(table(rows, ["stage", "org", "from", "to", "cells"]))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    flags = sub.add_parser("flags", help="feature flags: define, inspect, evaluate, preview")
    cmds = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    p = cmds.add_parser("set", help="create or replace a flag from a YAML or JSON file")
    p.add_argument("file")
    p.set_defaults(run=set_flag)
    p = cmds.add_parser("list", help="every flag")
    p.set_defaults(run=list_flags)
    p = cmds.add_parser("show", help="one flag, whole")
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
