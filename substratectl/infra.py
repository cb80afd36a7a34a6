"""`substratectl infra ...`: publish an infrastructure template, list the published versions,
and see each cell's compliance with its deadline."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.requests.infra import (
    ComplianceView,
    InfraList,
    InfraPublish,
    InfraStatus,
    PublishedTemplate,
)
from substratectl.context import Ctl, FileProblem
from substratectl.output import moment, table


def _read_template(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise FileProblem(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FileProblem(f"{path} is not a text file") from None


def _published(result: PublishedTemplate) -> str:
    return (
        f"published template {result.version} at {result.location}\n"
        f"cells on an older version must apply it by {moment(result.deadline)}"
    )


async def publish(ctl: Ctl) -> int:
    a = ctl.args
    template = _read_template(Path(a.template))
    return await ctl.ask(
        InfraPublish(version=a.version, template=template, grace=a.grace), _published
    )


async def list_templates(ctl: Ctl) -> int:
    columns = ["version", "published_at", "grace_seconds", "location"]
    return await ctl.ask(InfraList(), lambda templates: table(templates, columns))


STATUS_COLUMNS = [
    "cell",
    "org",
    "template_version",
    "required_version",
    "deadline",
    "state",
    "reminders_sent",
]


def _compliance(result: ComplianceView) -> str:
    s = result.summary
    return (
        f"{table(result.cells, STATUS_COLUMNS)}\n\n"
        f"{s.compliant} compliant, {s.pending} pending, {s.out_of_sla} out of SLA; "
        f"{s.breach_within_24h} breach within 24 h, {s.breach_within_7d} within 7 days"
    )


async def status(ctl: Ctl) -> int:
    return await ctl.ask(InfraStatus(cell=ctl.args.cell), _compliance)


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
