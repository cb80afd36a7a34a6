"""`substratectl cells ...`: create, list, show, rotate credentials, decommission, pin."""

from __future__ import annotations

import argparse
import sys

from common.requests.registry import (
    MAX_PAGE,
    CellsAudit,
    CellsCreate,
    CellsDecommission,
    CellsList,
    CellsRotateCredentials,
    CellsShow,
    CellView,
    ListedCell,
)
from common.requests.rollout import CellsPin, CellsUnpin
from common.vocabulary import CELL_STATUSES, STAGES
from substratectl.context import Ctl
from substratectl.output import emit_json, fields, table

# A page an operator reads on a screen; --all (or --limit) for more.
DEFAULT_PAGE = 1000
LIST_COLUMNS = [
    "id", "stage", "region", "org", "status", "last_heartbeat_at", "agent_version",
    "installed_release", "flags_behind",
]  # fmt: skip


def _show(ctl: Ctl, record: CellView) -> None:
    if ctl.as_json:
        emit_json(record)
        return
    print(fields(record.model_dump(mode="json", exclude={"refused_registrations"})))
    for refusal in record.refused_registrations:
        print(f"refused registration at {refusal['at']}: {refusal['reason']}")


async def create(ctl: Ctl) -> int:
    a = ctl.args
    request = CellsCreate(
        id=a.id, stage=a.stage, region=a.region, org=a.org, aws_account=a.aws_account or None
    )
    record = await ctl.call(request)
    if ctl.as_json:
        emit_json(record)
        return 0
    print(
        fields(record.model_dump(mode="json", include={"id", "stage", "region", "org", "status"}))
    )
    print("\nAgent URL (shown once; give it to the customer as CELL_AMQP_URL):")
    print(f"  {record.amqp_url}")
    print("\nCloudFormation parameters for cell_agent/bootstrap/cell.yaml:")
    for key, value in record.stack_parameters.items():
        print(f"  {key}={value}")
    return 0


async def list_cells(ctl: Ctl) -> int:
    """One page of cells (``--limit`` after ``--after``), or with ``--all`` every page."""
    args = ctl.args
    limit = MAX_PAGE if args.all else args.limit
    cells: list[ListedCell] = []
    after = args.after
    while True:
        page = await ctl.call(CellsList(stage=args.stage, status=args.status, after=after,
                                        limit=limit))  # fmt: skip
        cells.extend(page)
        if not args.all or len(page) < limit:
            break
        after = page[-1].id
        if not ctl.as_json:
            print(f"read {len(cells):,} cells ...", file=sys.stderr, flush=True)
    if ctl.as_json:
        emit_json(cells)
        return 0
    print(table(cells, LIST_COLUMNS))
    if not args.all and len(cells) == limit:
        print(f"\n{limit} cells shown; the next page: --after {cells[-1].id} (or --all)",
              file=sys.stderr)  # fmt: skip
    return 0


def page_size(text: str) -> int:
    """``--limit``: a page of 1 to MAX_PAGE cells."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= n <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and {MAX_PAGE}")
    return n


async def show(ctl: Ctl) -> int:
    cell = await ctl.call(CellsShow(id=ctl.args.id))
    _show(ctl, cell)
    return 0


async def rotate(ctl: Ctl) -> int:
    result = await ctl.call(CellsRotateCredentials(id=ctl.args.id))
    if ctl.as_json:
        emit_json(result)
        return 0
    print(
        f"new credentials {result.credential_id} sent to {result.id}'s agent; the old "
        "password no longer opens new connections."
    )
    print(
        "If the agent is offline, give the customer this URL (shown once) as CELL_AMQP_URL:\n"
        f"  {result.amqp_url}"
    )
    return 0


async def decommission(ctl: Ctl) -> int:
    _show(ctl, await ctl.call(CellsDecommission(id=ctl.args.id)))
    return 0


async def audit(ctl: Ctl) -> int:
    """Debug access the cell's customer opened and closed, in the order the cell reported it."""
    lines = await ctl.call(CellsAudit(id=ctl.args.id))
    if ctl.as_json:
        emit_json(lines)
    else:
        print(table(lines, ["seq", "at", "action", "role_arn", "expires_at", "reason",
                            "granted_by"]))  # fmt: skip
    return 0


async def pin(ctl: Ctl) -> int:
    result = await ctl.call(CellsPin(id=ctl.args.id, version=ctl.args.version))
    if ctl.as_json:
        emit_json(result)
    else:
        print(f"{result.cell} pinned to {result.pinned}; no rollout moves it until unpinned")
    return 0


async def unpin(ctl: Ctl) -> int:
    result = await ctl.call(CellsUnpin(id=ctl.args.id))
    if ctl.as_json:
        emit_json(result)
    else:
        print(f"{result.cell} unpinned; it is brought up to date with its stage")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cells = sub.add_parser("cells", help="create, list and manage cells")
    cmds = cells.add_subparsers(dest="cells_command", required=True, metavar="ACTION")

    p = cmds.add_parser("create", help="create a cell and its broker credentials")
    p.add_argument("id", help="cell id: a DNS label, not starting with svc- or op-")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--region", required=True, help="AWS region, e.g. eu-west-1")
    p.add_argument("--org", required=True, help="the customer organisation")
    p.add_argument("--aws-account", help="bind the cell to this 12-digit AWS account now")
    p.set_defaults(run=create)

    p = cmds.add_parser("list", help="list cells")
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--status", choices=CELL_STATUSES)
    p.add_argument("--limit", type=page_size, default=DEFAULT_PAGE,
                   help=f"at most this many cells, by id (default {DEFAULT_PAGE}, at most "
                        f"{MAX_PAGE})")  # fmt: skip
    p.add_argument(
        "--after", metavar="CELL_ID", help="the cells after this id (the last of the previous page)"
    )
    p.add_argument("--all", action="store_true", help="every cell, read page by page")
    p.set_defaults(run=list_cells)

    p = cmds.add_parser("show", help="show one cell")
    p.add_argument("id")
    p.set_defaults(run=show)

    p = cmds.add_parser("rotate-credentials", help="give the cell's agent a new password")
    p.add_argument("id")
    p.set_defaults(run=rotate)

    p = cmds.add_parser(
        "decommission", help="delete the cell's credentials and queue; keep its record"
    )
    p.add_argument("id")
    p.set_defaults(run=decommission)

    p = cmds.add_parser("audit", help="the cell's debug access: granted, revoked, expired")
    p.add_argument("id")
    p.set_defaults(run=audit)

    p = cmds.add_parser("pin", help="keep a cell on one release (never an older one)")
    p.add_argument("id")
    p.add_argument("version")
    p.set_defaults(run=pin)

    p = cmds.add_parser("unpin", help="let rollouts move the cell again")
    p.add_argument("id")
    p.set_defaults(run=unpin)
