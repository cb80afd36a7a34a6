"""`substratectl windows ...`: when a cell (or an org's cells) may be updated by a release that
needs a maintenance window."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.requests.rollout import WindowsClear, WindowsEntry, WindowsList, WindowsSet
from substratectl.context import Ctl, read_mapping_file
from substratectl.output import table


def _describe(entry: WindowsEntry) -> str:
    w = entry.windows
    spans = "; ".join(
        f"{','.join(x.days)} {x.start} for {x.duration_minutes} min" for x in w.windows
    )
    state = "open now" if entry.open_now else f"next opens {entry.next_open}"
    return f"{entry.owner}: {spans} ({w.time_zone}); {state}"


def _owner(ctl: Ctl) -> dict[str, str | None]:
    return {"cell": ctl.args.cell, "org": ctl.args.org}


async def set_windows(ctl: Ctl) -> int:
    windows = read_mapping_file(Path(ctl.args.file), "a mapping with time_zone and windows")
    request = WindowsSet.model_validate({**_owner(ctl), "windows": windows})
    return await ctl.ask(request, lambda e: f"windows set: {_describe(e)}")


async def clear(ctl: Ctl) -> int:
    request = WindowsClear.model_validate(_owner(ctl))
    return await ctl.ask(request, lambda e: f"windows cleared: {e.owner}")


async def list_windows(ctl: Ctl) -> int:
    def text(entries: list[WindowsEntry]) -> str:
        rows = [{"owner": e.owner, "windows": _describe(e).split(": ", 1)[1]} for e in entries]
        return table(rows, ["owner", "windows"])

    return await ctl.ask(WindowsList(), text)


def _who(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--cell", help="this cell's windows (they win over its org's)")
    who.add_argument("--org", help="the windows of every cell of this org without its own")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    windows = sub.add_parser("windows", help="maintenance windows of cells and orgs")
    cmds = windows.add_subparsers(dest="windows_command", required=True, metavar="ACTION")
    p = cmds.add_parser("set", help="set the windows from a YAML or JSON file")
    _who(p)
    p.add_argument(
        "file",
        help='time_zone (IANA), windows: [{days: [sat, sun], start: "02:00", '
        "duration_minutes: 240}]",
    )
    p.set_defaults(run=set_windows)
    p = cmds.add_parser("clear", help="remove a cell's or an org's windows")
    _who(p)
    p.set_defaults(run=clear)
    p = cmds.add_parser("list", help="every set of windows, and whether it is open")
    p.set_defaults(run=list_windows)
