"""The customer's side of a mandatory infrastructure update.

The control plane tells the agent what template version its stack must run, where the template
is and by when (``command.infra-required``); the agent keeps that in CELL_STATE_DIR so the
customer can read it at any time (``cell-agent infra status``). Previewing and applying the
update run with the customer's own AWS credentials: only they can change their stack, and the
agent's role cannot. After an update the running agent's next template check (at its periodic
sync) reads the new ``TemplateVersion`` and its heartbeats report it.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from botocore.exceptions import ClientError, WaiterError
from pydantic import AwareDatetime, BaseModel

from cell_agent.journal import write_atomically
from common.messages import Delivery, InfraRequired
from common.vocabulary import ComplianceState

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_cloudformation.type_defs import ParameterTypeDef

# An update adds or changes IAM resources (the debug-access permissions, for one).
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"]
# Stack updates of a cell take minutes on AWS; the emulator takes a moment.
WAIT_SECONDS = 1800


class InfraProblem(Exception):
    """Something the customer must fix before an update can go on; the message says what."""


class Requirement(BaseModel):
    """What the control plane last said of this cell's infrastructure."""

    status: ComplianceState
    required_version: str | None = None
    location: str | None = None
    deadline: AwareDatetime | None = None
    received_at: AwareDatetime


class RequirementFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "infra" / "required.json"

    def read(self) -> Requirement | None:
        if not self.path.exists():
            return None
        return Requirement.model_validate_json(self.path.read_text())

    def write(self, msg: InfraRequired) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        requirement = Requirement(
            status=msg.status,
            required_version=msg.required_version,
            location=msg.location,
            deadline=msg.deadline,
            received_at=msg.issued_at,
        )
        write_atomically(self.path, requirement.model_dump_json(indent=2))

    async def on_required(self, msg: InfraRequired, delivery: Delivery) -> None:
        """Newer word replaces older (commands of one cell arrive in order)."""
        current = self.read()
        if current is None or msg.issued_at >= current.received_at:
            self.write(msg)


@dataclass(frozen=True)
class Change:
    """One resource a stack update would change."""

    action: str
    resource: str
    type: str
    replacement: str


class Stack:
    """The cell's CloudFormation stack, with the caller's credentials."""

    def __init__(self, name: str, region: str) -> None:
        self.name = name
        self.region = region
        self._cfn: CloudFormationClient = boto3.client("cloudformation", region_name=region)

    def outputs(self) -> dict[str, str]:
        stack = self._cfn.describe_stacks(StackName=self.name)["Stacks"][0]
        return {
            o["OutputKey"]: o["OutputValue"]
            for o in stack.get("Outputs", [])
            if "OutputKey" in o and "OutputValue" in o
        }

    def parameters(self) -> dict[str, str]:
        stack = self._cfn.describe_stacks(StackName=self.name)["Stacks"][0]
        return {
            p["ParameterKey"]: p.get("ParameterValue", "")
            for p in stack.get("Parameters", [])
            if "ParameterKey" in p
        }

    def template_version(self) -> str | None:
        return self.outputs().get("TemplateVersion")

    def _carried_over(self, template: str) -> list[ParameterTypeDef]:
        """The stack's parameters, kept as they are; ones new in the template take their
        defaults (a parameter the new template dropped is not sent). A secret (NoEcho) is kept
        by reference, since the stack shows it masked; the others by value."""
        summary = self._cfn.get_template_summary(TemplateBody=template)
        secret = {
            p["ParameterKey"]: p.get("NoEcho", False)
            for p in summary.get("Parameters", [])
            if "ParameterKey" in p
        }
        kept: list[ParameterTypeDef] = []
        for key, value in self.parameters().items():
            if key not in secret:
                continue
            if secret[key]:
                kept.append({"ParameterKey": key, "UsePreviousValue": True})
            else:
                kept.append({"ParameterKey": key, "ParameterValue": value})
        return kept

    def preview(self, template: str, version: str) -> tuple[str, list[Change]]:
        """Create (and leave, for the console) a change set; what it would change."""
        name = f"substrate-template-{version}-{int(time.time())}"
        self._cfn.create_change_set(
            StackName=self.name,
            ChangeSetName=name,
            TemplateBody=template,
            Parameters=self._carried_over(template),
            Capabilities=CAPABILITIES,  # type: ignore[arg-type]
            ChangeSetType="UPDATE",
            Description=f"Substrate infrastructure template {version} (preview)",
        )
        # "No changes" ends the waiter with a failure; the description says which it was.
        with suppress(WaiterError):
            self._cfn.get_waiter("change_set_create_complete").wait(
                StackName=self.name,
                ChangeSetName=name,
                WaiterConfig={"Delay": 2, "MaxAttempts": WAIT_SECONDS // 2},
            )
        described = self._cfn.describe_change_set(StackName=self.name, ChangeSetName=name)
        changes = []
        for c in described.get("Changes", []):
            rc = c.get("ResourceChange", {})
            action, resource = rc.get("Action", "?"), rc.get("LogicalResourceId", "?")
            kind, replacement = rc.get("ResourceType", "?"), rc.get("Replacement", "-")
            changes.append(Change(action, resource, kind, replacement))
        return name, changes

    def update(self, template: str) -> str:
        """Update the stack to ``template`` and wait for it; the stack's final status."""
        try:
            self._cfn.update_stack(
                StackName=self.name,
                TemplateBody=template,
                Parameters=self._carried_over(template),
                Capabilities=CAPABILITIES,  # type: ignore[arg-type]
            )
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", str(exc))
            if "No updates are to be performed" in message:
                return "UPDATE_COMPLETE"
            raise InfraProblem(f"CloudFormation refused the update: {message}") from None
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            status = self._cfn.describe_stacks(StackName=self.name)["Stacks"][0]["StackStatus"]
            if not status.endswith("_IN_PROGRESS"):
                return status
            time.sleep(2)
        raise InfraProblem(f"stack {self.name} still updating after {WAIT_SECONDS}s")


def download(location: str, region: str) -> str:
    """The template at ``s3://bucket/key``."""
    parts = urlsplit(location)
    if parts.scheme != "s3" or not parts.netloc or not parts.path:
        raise InfraProblem(f"template location {location!r} is not an s3:// address")
    s3 = boto3.client("s3", region_name=region)
    body = s3.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"].read()
    return body.decode()
