"""`substratectl rollout ...`: so far, the dry-run plan of a release."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from substratectl.output import emit_json, table

if TYPE_CHECKING:
    from substratectl.cli import Ctl


async def plan(ctl: Ctl) -> int:
    result = await ctl.call("rollout", "rollout.plan", {"version": ctl.args.version})
    if ctl.as_json:
        emit_json(result)
        return 0
    print(f"plan for {result['version']} (nothing is sent):")
    for stage, waves in result["stages"].items():
        if not waves:
            print(f"  {stage}: no cells")
        for n, cells in enumerate(waves, 1):
            label = "canary" if stage == "dedicated" and n == 1 else f"wave {n}"
            print(f"  {stage} {label}: {len(cells)} cells: {', '.join(cells)}")
    skipped = [{"cell": c, "reason": r} for c, r in sorted(result["skipped"].items())]
    if skipped:
        print("\nskipped:")
        print(table(skipped, ["cell", "reason"]))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser("rollout", help="how releases reach the fleet")
    cmds = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    p = cmds.add_parser(
        "plan", help="dry run: which cells a release reaches in which stage and wave, and why not"
    )
    p.add_argument("version")
    p.set_defaults(run=plan)
