"""`substratectl cells ...`: create, list, show, rotate credentials, decommission, pin."""

from __future__ import annotations

import argparse

from common.requests.registry import (
    CellsAudit,
    CellsCreate,
    CellsDecommission,
    CellsList,
    CellsRotateCredentials,
    CellsShow,
    CellView,
)
from common.requests.rollout import CellsPin, CellsUnpin
from common.vocabulary import CELL_STATUSES, STAGES
from substratectl.context import Ctl
from substratectl.output import emit_json, fields, table

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
    cells = await ctl.call(CellsList(stage=ctl.args.stage, status=ctl.args.status))
    if ctl.as_json:
        emit_json(cells)
    else:
        print(table(cells, LIST_COLUMNS))
    return 0


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
