"""`substratectl cells ...`: create, list, show, rotate credentials, decommission, pin."""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.fields import printable
from common.requests.registry import (
    MAX_PAGE,
    SELECTABLE,
    CellsAudit,
    CellsCreate,
    CellsDecommission,
    CellsList,
    CellsRotateCredentials,
    CellsShow,
    CellView,
    CreatedCell,
    ListedCell,
    Match,
    RotatedCredentials,
)
from common.requests.rollout import CellsPin, CellsUnpin
from common.vocabulary import CELL_STATUSES, STAGES
from substratectl.context import Ctl
from substratectl.conventions import add_watch, add_yes
from substratectl.output import Stream, fields, table

# A page an operator reads on a screen; --all (or --limit) for more.
DEFAULT_PAGE = 1000
# The narrow table fits a terminal; -o wide adds the rest.
LIST_COLUMNS = ["id", "stage", "status", "installed_release", "last_heartbeat_at"]
WIDE_COLUMNS = ["region", "org", "agent_version", "flags_behind"]


def _record(record: CellView) -> str:
    lines = [fields(record.model_dump(mode="json", exclude={"refused_registrations"}))]
    lines += [
        f"refused registration at {refusal['at']}: {printable(str(refusal['reason']))}"
        for refusal in record.refused_registrations
    ]
    return "\n".join(lines)


def _created(record: CreatedCell) -> str:
    shown = record.model_dump(mode="json", include={"id", "stage", "region", "org", "status"})
    parameters = "\n".join(f"  {key}={value}" for key, value in record.stack_parameters.items())
    return (
        f"{fields(shown)}\n\n"
        "Agent URL (shown once; give it to the customer as CELL_AMQP_URL):\n"
        f"  {record.amqp_url}\n\n"
        "CloudFormation parameters for cell_agent/bootstrap/cell.yaml:\n"
        f"{parameters}"
    )


async def create(ctl: Ctl) -> int:
    a = ctl.args
    request = CellsCreate(
        id=a.id, stage=a.stage, region=a.region, org=a.org, aws_account=a.aws_account or None
    )
    return await ctl.ask(request, _created)


async def list_cells(ctl: Ctl) -> int:
    """One page of cells (``--limit`` after ``--after``), or with ``--all`` every page. The
    registry filters; every page of ``--all`` is printed as it comes (with --json, -o name),
    so the listing costs what it prints, whatever the fleet's size."""
    args = ctl.args
    limit = MAX_PAGE if args.all else args.limit
    # JSON and names are printed as each page comes, with one encoder call a page (json.dump's
    # indenting encoder is Python: a tenth of a second a page of 1,000).
    streamed = ctl.output in ("json", "name") and not getattr(args, "watch", False)
    cells: list[ListedCell] = []
    out = Stream(sys.stdout, as_json=ctl.as_json) if streamed else None

    def page_after(after: str | None) -> asyncio.Task[list[ListedCell]]:
        request = CellsList(
            stage=args.stage,
            status=args.status,
            org=args.org,
            release=args.release,
            selector=args.selector or [],
            after=after,
            limit=limit,
            decommissioned=args.decommissioned,
        )
        return asyncio.create_task(ctl.call(request))

    # With --all the next page is asked for as soon as this one's last id is known, so the
    # registry reads it while this one is printed.
    pending: asyncio.Task[list[ListedCell]] | None = page_after(args.after)
    read = 0
    while pending is not None:
        page = await pending
        read += len(page)
        more = args.all and len(page) == limit
        pending = page_after(page[-1].id) if more else None
        if out is not None:
            # Printed in a worker thread: meanwhile the event loop sends the next request and
            # takes its answer.
            await asyncio.to_thread(out.items, page)
        else:
            cells.extend(page)
        if more and not ctl.as_json and ctl.output != "name":
            print(f"read {read:,} cells ...", file=sys.stderr, flush=True)
    if out is not None:
        out.end()
        return 0
    ctl.show(cells, lambda found: table(found, LIST_COLUMNS, WIDE_COLUMNS))
    if ctl.output in ("table", "wide") and not args.all and len(cells) == limit:
        next_page = f"--after {cells[-1].id}"
        print(f"\n{limit} cells shown; the next page: {next_page} (or --all)", file=sys.stderr)
    return 0


def selector(text: str) -> list[Match]:
    """``--selector``: tests joined by commas, each ``FIELD=VALUE`` or ``FIELD!=VALUE``."""
    tests = []
    for part in text.split(","):
        field, op, value = _split_test(part.strip())
        if field not in SELECTABLE:
            raise argparse.ArgumentTypeError(
                f"unknown field {field!r} in {part.strip()!r}; one of {', '.join(SELECTABLE)}"
            )
        if len(value) > 128:
            raise argparse.ArgumentTypeError(f"the value for {field} is over 128 characters")
        tests.append(Match.model_validate({"field": field, "op": op, "value": value}))
    return tests


def _split_test(part: str) -> tuple[str, str, str]:
    for op in ("!=", "="):
        field, found, value = part.partition(op)
        if found:
            return field.strip(), op, value.strip()
    raise argparse.ArgumentTypeError(f"not FIELD=VALUE or FIELD!=VALUE: {part!r}")


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
    return await ctl.ask(CellsShow(id=ctl.args.id), _record)


def _rotated(result: RotatedCredentials) -> str:
    if result.status == "deliver_by_hand":
        return (
            f"new credentials {result.credential_id} for {result.id}: no key of its agent is "
            "bound, so nothing was sent and every connection of the cell was closed.\n"
            "Give the customer this URL (shown once) as CELL_AMQP_URL:\n"
            f"  {result.amqp_url}"
        )
    return (
        f"new credentials {result.credential_id} sent to {result.id}'s agent, sealed to its "
        f"key {result.rotation_key}; the old password no longer opens new connections.\n"
        "If the agent is offline, give the customer this URL (shown once) as CELL_AMQP_URL:\n"
        f"  {result.amqp_url}"
    )


async def rotate(ctl: Ctl) -> int:
    request = CellsRotateCredentials(id=ctl.args.id, rebind=ctl.args.rebind)
    return await ctl.ask(request, _rotated)


async def decommission(ctl: Ctl) -> int:
    ctl.confirm(
        f"decommission {ctl.args.id}? Its credentials and queue are deleted and the id is "
        "never used again"
    )
    return await ctl.ask(CellsDecommission(id=ctl.args.id), _record)


AUDIT_COLUMNS = ["seq", "at", "action", "role_arn", "expires_at", "reason", "granted_by"]


async def audit(ctl: Ctl) -> int:
    """Debug access the cell's customer opened and closed, in the order the cell reported it."""
    return await ctl.ask(CellsAudit(id=ctl.args.id), lambda lines: table(lines, AUDIT_COLUMNS))


async def pin(ctl: Ctl) -> int:
    return await ctl.ask(
        CellsPin(id=ctl.args.id, version=ctl.args.version),
        lambda r: f"{r.cell} pinned to {r.pinned}; no rollout moves it until unpinned",
    )


async def unpin(ctl: Ctl) -> int:
    return await ctl.ask(
        CellsUnpin(id=ctl.args.id),
        lambda r: f"{r.cell} unpinned; it is brought up to date with its stage",
    )


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

    p = cmds.add_parser("list", help="list cells (not decommissioned ones unless asked)")
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--status", choices=CELL_STATUSES)
    p.add_argument("--org", help="only this org's cells")
    p.add_argument("--release", metavar="VERSION", help="only cells that run this release")
    p.add_argument(
        "--selector",
        "-l",
        type=selector,
        metavar="TESTS",
        help="only cells that pass every test: FIELD=VALUE or FIELD!=VALUE, joined by commas "
        f"(fields: {', '.join(SELECTABLE)}; an absent field is empty)",
    )
    p.add_argument(
        "--limit",
        type=page_size,
        default=DEFAULT_PAGE,
        help=f"at most this many cells, by id (default {DEFAULT_PAGE}, at most {MAX_PAGE})",
    )
    p.add_argument(
        "--after", metavar="CELL_ID", help="the cells after this id (the last of the previous page)"
    )
    p.add_argument("--all", action="store_true", help="every cell, read page by page")
    p.add_argument(
        "--decommissioned",
        action="store_true",
        help="decommissioned cells too (--status decommissioned: only them)",
    )
    add_watch(p)
    p.set_defaults(run=list_cells)

    p = cmds.add_parser("show", help="show one cell")
    p.add_argument("id")
    p.set_defaults(run=show)

    p = cmds.add_parser("rotate-credentials", help="give the cell's agent a new password")
    p.add_argument("id")
    p.add_argument(
        "--rebind",
        action="store_true",
        help="forget the agent's bound key: send nothing, close every connection now, and "
        "print the URL to deliver by hand",
    )
    p.set_defaults(run=rotate)

    p = cmds.add_parser(
        "decommission", help="delete the cell's credentials and queue; keep its record"
    )
    p.add_argument("id")
    add_yes(p, "decommission")
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
