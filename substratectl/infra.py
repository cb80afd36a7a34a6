"""`substratectl infra ...`: publish an infrastructure template, list the published versions,
and see each cell's compliance with its deadline."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.requests.infra import InfraList, InfraPublish, InfraStatus
from substratectl.context import Ctl, FileProblem
from substratectl.output import emit_json, table


def _read_template(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise FileProblem(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FileProblem(f"{path} is not a text file") from None


async def publish(ctl: Ctl) -> int:
    a = ctl.args
    request = InfraPublish(version=a.version, template=_read_template(Path(a.template)),
                           grace=a.grace)  # fmt: skip
    result = await ctl.call(request)
    if ctl.as_json:
        emit_json(result)
    else:
        print(f"published template {result.version} at {result.location}")
        print(f"cells on an older version must apply it by {result.deadline.isoformat()}")
    return 0


async def list_templates(ctl: Ctl) -> int:
    result = await ctl.call(InfraList())
    if ctl.as_json:
        emit_json(result)
    else:
        print(table(result, ["version", "published_at", "grace_seconds", "location"]))
    return 0


async def status(ctl: Ctl) -> int:
    result = await ctl.call(InfraStatus(cell=ctl.args.cell))
    if ctl.as_json:
        emit_json(result)
        return 0
    columns = ["cell", "org", "template_version", "required_version", "deadline", "state",
               "reminders_sent"]  # fmt: skip
    print(table(result.cells, columns))
    s = result.summary
    print(
        f"\n{s.compliant} compliant, {s.pending} pending, {s.out_of_sla} out of SLA; "
        f"{s.breach_within_24h} breach within 24 h, {s.breach_within_7d} within 7 days"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    infra = sub.add_parser("infra", help="infrastructure templates and their deadlines")
    cmds = infra.add_subparsers(dest="infra_command", required=True, metavar="ACTION")
    p = cmds.add_parser(
        "publish", help="publish a template version (linted, stored in S3); starts deadlines"
    )
    p.add_argument("version", help="the template's TemplateVersion: a whole number")
    p.add_argument("--template", required=True, help="the CloudFormation template file")
    p.add_argument("--grace", default="14d", help="time to apply it: 14d, 36h, 90s (default 14d)")
    p.set_defaults(run=publish)
    p = cmds.add_parser("list", help="published template versions, newest first")
    p.set_defaults(run=list_templates)
    p = cmds.add_parser("status", help="each cell's compliance, deadline and reminders")
    p.add_argument("--cell", help="one cell only")
    p.set_defaults(run=status)
