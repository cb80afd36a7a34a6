"""The infra_compliance service's methods: publishing an infrastructure template, the published
versions, and each cell's compliance."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from common.requests import Request, Response, ServiceStatus, rpc
from common.vocabulary import ComplianceState

# A CloudFormation template body sent inline is at most 51,200 bytes; one stored in S3 may be
# up to 1 MB, but the bus's largest message is 256 KiB.
MAX_TEMPLATE_BYTES = 200 * 1024


class PublishedTemplate(Response):
    version: str
    location: str
    published_at: datetime
    published_by: str
    grace_seconds: float
    # The deadline of a cell that is on an older version when the template is published.
    deadline: datetime


class CellCompliance(Response):
    cell: str
    org: str | None
    template_version: str | None
    required_version: str | None
    deadline: datetime | None
    state: ComplianceState
    reminders_sent: int


class ComplianceSummary(Response):
    compliant: int
    pending: int
    out_of_sla: int
    # Pending cells whose deadline falls within the next 24 hours / 7 days.
    breach_within_24h: int
    breach_within_7d: int


class ComplianceView(Response):
    cells: list[CellCompliance]
    summary: ComplianceSummary


class InfraServiceStatus(ServiceStatus):
    newest_template: str | None
    cells: dict[str, int]


@rpc("infra_compliance", "infra.publish")
class InfraPublish(Request[PublishedTemplate]):
    """Publish a template version: linted, stored in S3, announced; it starts a deadline for
    every cell on an older version."""

    version: str = Field(pattern=r"^[1-9][0-9]{0,8}$")
    template: str = Field(min_length=1, max_length=MAX_TEMPLATE_BYTES)
    grace: str = "14d"


@rpc("infra_compliance", "infra.list", read_only=True)
class InfraList(Request[list[PublishedTemplate]]):
    pass


@rpc("infra_compliance", "infra.status", read_only=True)
class InfraStatus(Request[ComplianceView]):
    """Every cell's compliance (or one cell's), and how many breach soon."""

    cell: str | None = None
