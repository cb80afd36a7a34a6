"""The commands a cell's customer runs beside the agent, with their own AWS credentials:
``cell-agent infra status|preview|apply`` and ``cell-agent debug-access grant|list|revoke``.
Each prints a few lines (or ``--json``) and exits non-zero with a one-line reason on error."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from cell_agent.debug_access import DebugAccess, Grant, Refused, external_id
from cell_agent.infra import InfraProblem, RequirementFile, Stack, download
from cell_agent.pending import PendingDebugAccess, PendingReports
from cell_agent.settings import AgentSettings


class Problem(Exception):
    """Refused, with the reason for the customer."""


def _print(payload: dict[str, object], lines: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print("\n".join(lines))


def _stack(settings: AgentSettings) -> Stack:
    if not settings.stack_name:
        raise Problem("CELL_STACK_NAME is not set: which stack is the cell's?")
    return Stack(settings.stack_name, settings.aws_region)


# -- infra ----------------------------------------------------------------------------------------


def infra_status(settings: AgentSettings, as_json: bool) -> None:
    required = RequirementFile(settings.state_dir).read()
    runs = _stack(settings).template_version() if settings.stack_name else None
    payload: dict[str, object] = {
        "template_version": runs,
        "status": required.status if required else "unknown",
        "required_version": required.required_version if required else None,
        "deadline": required.deadline.isoformat() if required and required.deadline else None,
        "location": required.location if required else None,
    }
    if required is None:
        lines = ["the control plane has not said what this cell's infrastructure requires yet"]
    elif required.required_version is None:
        lines = [f"compliant: nothing to apply (the stack runs template {runs or '-'})"]
    else:
        when = required.deadline.isoformat() if required.deadline else "-"
        lines = [
            f"{required.status}: apply infrastructure template {required.required_version} "
            f"by {when}",
            f"the stack runs template {runs or '-'}",
            f"template: {required.location}",
            "`cell-agent infra preview` shows what would change; `cell-agent infra apply` "
            "applies it.",
        ]
        if required.status == "out_of_sla":
            lines.insert(1, "the deadline has passed: this cell gets no application updates")
    _print(payload, lines, as_json)


def _required_template(settings: AgentSettings) -> tuple[str, str]:
    required = RequirementFile(settings.state_dir).read()
    if required is None or required.location is None or required.required_version is None:
        raise Problem("no infrastructure update is required for this cell")
    return required.required_version, download(required.location, settings.aws_region)


def infra_preview(settings: AgentSettings, as_json: bool) -> None:
    version, template = _required_template(settings)
    name, changes = _stack(settings).preview(template, version)
    payload: dict[str, object] = {
        "change_set": name,
        "required_version": version,
        "changes": [asdict(c) for c in changes],
    }
    lines = [f"change set {name} (not executed) for template {version}:"]
    shown = [
        f"  {c.action:<7} {c.resource} ({c.type}), replacement: {c.replacement}" for c in changes
    ]
    lines += shown or ["  no resource changes (outputs or parameters only)"]
    _print(payload, lines, as_json)


def infra_apply(settings: AgentSettings, as_json: bool) -> None:
    _, template = _required_template(settings)
    stack = _stack(settings)
    status = stack.update(template)
    if status != "UPDATE_COMPLETE":
        raise Problem(f"stack {stack.name} ended {status}; see its events in CloudFormation")
    runs = stack.template_version()
    payload: dict[str, object] = {"stack": stack.name, "status": status, "template_version": runs}
    lines = [
        f"stack {stack.name} updated to template {runs}; the agent reports it on its "
        "next template check"
    ]
    _print(payload, lines, as_json)


# -- debug access ---------------------------------------------------------------------------------


def _principal(settings: AgentSettings) -> str:
    if settings.stack_name:
        principal = _stack(settings).parameters().get("SupportPrincipal")
        if principal:
            return principal
    if settings.support_principal:
        return settings.support_principal
    raise Problem(
        "no support principal: the cell's stack has no SupportPrincipal parameter (apply the "
        "newest template) and CELL_SUPPORT_PRINCIPAL is not set"
    )


def _who(settings: AgentSettings, given: str | None) -> str:
    if given:
        return given
    sts = boto3.client("sts", region_name=settings.aws_region)
    return str(sts.get_caller_identity()["Arn"])


def _grant_json(g: Grant) -> dict[str, object]:
    return {
        "role_name": g.role_name,
        "role_arn": g.role_arn,
        "expires_at": g.expires_at.isoformat(),
        "reason": g.reason,
        "granted_by": g.granted_by,
    }


def debug_grant(
    settings: AgentSettings, hours: float, reason: str, by: str | None, as_json: bool
) -> None:
    principal = _principal(settings)
    external = external_id(settings.id)
    grant = DebugAccess(settings.aws_region).grant(
        principal,
        hours,
        reason,
        _who(settings, by),
        max_hours=settings.debug_max_hours,
        external=external,
    )
    PendingReports(settings.state_dir).add(
        PendingDebugAccess(
            action="granted",
            role_arn=grant.role_arn,
            occurred_at=datetime.now(UTC),
            expires_at=grant.expires_at,
            reason=grant.reason,
            granted_by=grant.granted_by,
        )
    )
    lines = [
        f"debug access granted until {grant.expires_at.isoformat()}: {grant.role_arn}",
        f"only {principal} may assume it, with external id {external}, read-only; "
        f"`cell-agent debug-access revoke {grant.role_name}` closes it sooner",
    ]
    _print({**_grant_json(grant), "external_id": external}, lines, as_json)


def debug_list(settings: AgentSettings, as_json: bool) -> None:
    grants = DebugAccess(settings.aws_region).grants()
    if as_json:
        print(json.dumps([_grant_json(g) for g in grants], indent=2))
        return
    if not grants:
        print("no debug access is open")
    for g in grants:
        state = "expired, to be deleted" if g.expired else f"until {g.expires_at.isoformat()}"
        print(f"{g.role_name}  {state}  by {g.granted_by}: {g.reason}")


def debug_revoke(settings: AgentSettings, name: str | None, as_json: bool) -> None:
    access = DebugAccess(settings.aws_region)
    grants = [g for g in access.grants() if name is None or g.role_name == name]
    if name is not None and not grants:
        raise Problem(f"no debug access named {name!r} (see `cell-agent debug-access list`)")
    pending = PendingReports(settings.state_dir)
    for grant in grants:
        access.revoke(grant)
        pending.add(
            PendingDebugAccess(
                action="revoked",
                role_arn=grant.role_arn,
                occurred_at=datetime.now(UTC),
                expires_at=grant.expires_at,
                reason=grant.reason,
                granted_by=grant.granted_by,
            )
        )
    _print(
        {"revoked": [g.role_arn for g in grants]},
        [f"revoked {g.role_arn}" for g in grants] or ["no debug access is open"],
        as_json,
    )


def run(settings: AgentSettings, command: Callable[[], None]) -> int:
    """Run a customer command; one line and exit code 1 on a refusal or an AWS error."""
    try:
        command()
    except (Problem, Refused, InfraProblem) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"error: AWS: {exc}", file=sys.stderr)
        return 1
    return 0
