"""The registry's methods: creating and inspecting cells, their credentials, decommissioning."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from common.fields import CellId
from common.requests import Request, Response, ServiceStatus, rpc
from common.vocabulary import CellStatus, ComplianceState, DebugAccessAction, Stage


class CellView(Response):
    """What an operator sees of a cell (``cells show``, ``cells decommission``)."""

    id: str
    stage: Stage
    region: str
    org: str
    status: CellStatus
    created_at: datetime
    registered_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    agent_version: str | None = None
    aws_account_id: str | None = None
    installed_release: str | None = None
    applied_generation: int | None = None
    infra_template_version: str | None = None
    maintenance: bool = False
    maintenance_since: datetime | None = None
    maintenance_until: datetime | None = None
    maintenance_seconds_total: float = 0.0
    stack_name: str | None = None
    flags_snapshot_version: int | None = None
    credential_id: str | None = None
    credentials_pending: bool = False
    # The public key the cell's rotated secrets are sealed to (``cell-agent status`` shows
    # the agent's own, to compare).
    rotation_key: str | None = None
    decommissioned_at: datetime | None = None
    # Its infrastructure template's compliance (infra_compliance decides, the registry shows).
    compliance: ComplianceState | None = None
    compliance_deadline: datetime | None = None
    refused_registrations: list[dict[str, Any]] = Field(default_factory=list)


class ListedCell(CellView):
    """A cell in ``cells list`` and ``cells show``: whether its flags snapshot is behind."""

    flags_behind: bool = False


class CreatedCell(CellView):
    """A new cell, with what its customer needs to bootstrap it (shown once)."""

    amqp_url: str
    stack_parameters: dict[str, str]


class AuditEntry(Response):
    """A line of a cell's audit trail: debug access its customer granted, revoked, or that
    expired, as the cell's agent reported it."""

    seq: int
    at: datetime
    action: DebugAccessAction
    role_arn: str
    expires_at: datetime | None = None
    reason: str = ""
    granted_by: str = ""


class RotatedCredentials(Response):
    """``pending_confirmation``: the new secret went to the agent sealed to its key, and the
    old one's connections close when the agent confirms (or after ``grace_seconds``).
    ``deliver_by_hand``: the cell has no key bound (an agent from before sealing, or
    ``--rebind``), so nothing was sent and every connection was closed at once: the customer
    sets ``amqp_url`` as CELL_AMQP_URL."""

    id: str
    credential_id: str
    status: Literal["pending_confirmation", "deliver_by_hand"]
    amqp_url: str
    grace_seconds: float
    rotation_key: str | None = None


class RegistryServiceStatus(ServiceStatus):
    cells: dict[str, int]
    flags_behind: int
    # The broker's socket limit (summed over its nodes), where the management API says.
    broker_socket_limit: int | None = None
    warnings: list[str] = Field(default_factory=list)


# The most cells one `cells.list` answer holds: a page of 100,000 would be a reply of tens of
# megabytes, over the broker's default frame and the operator's patience.
MAX_PAGE = 5000


@rpc("registry", "cells.create", role="admin")
class CellsCreate(Request[CreatedCell]):
    """Create a cell: its record, its broker user and its command queue."""

    id: CellId
    stage: Stage
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")]
    org: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    aws_account: Annotated[str | None, Field(pattern=r"^[0-9]{12}$")] = None


# The fields of a cell a selector may test (``cells list --selector``).
Selectable = Literal[
    "stage", "status", "region", "org", "installed_release", "agent_version",
    "infra_template_version", "aws_account_id", "compliance",
]  # fmt: skip
SELECTABLE: tuple[str, ...] = Selectable.__args__  # type: ignore[attr-defined]


class Match(Response):
    """One test of a selector: the cell's ``field`` is (``=``) or is not (``!=``) ``value``;
    an absent field is the empty string."""

    field: Selectable
    op: Literal["=", "!="]
    value: Annotated[str, Field(max_length=128)]


@rpc("registry", "cells.list", read_only=True)
class CellsList(Request[list[ListedCell]]):
    """One page of cells, by id: those after ``after`` (a cell id; the last of the previous
    page), at most ``limit`` of them, that pass every filter. A page shorter than ``limit`` is
    the last. Decommissioned cells are history, not fleet: listed when asked for by status or
    with ``decommissioned``. The registry filters (from its indexes where it has one: stage,
    status, org) before it cuts the page, so a page costs what it shows."""

    stage: Stage | None = None
    status: CellStatus | None = None
    org: Annotated[str | None, Field(max_length=64)] = None
    release: Annotated[str | None, Field(max_length=128)] = None
    selector: Annotated[list[Match], Field(max_length=16)] = Field(default_factory=list)
    decommissioned: bool = False
    after: Annotated[str | None, Field(max_length=128)] = None
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = MAX_PAGE

    def matches(self) -> list[Match]:
        """Every filter as a selector's tests."""
        named = {"stage": self.stage, "status": self.status, "org": self.org,
                 "installed_release": self.release}  # fmt: skip
        found = [Match(field=f, op="=", value=v) for f, v in named.items() if v is not None]
        return found + list(self.selector)


@rpc("registry", "cells.show", read_only=True)
class CellsShow(Request[ListedCell]):
    id: str


@rpc("registry", "cells.rotate_credentials", role="admin")
class CellsRotateCredentials(Request[RotatedCredentials]):
    id: str
    # Forget the agent's bound key (its state directory was lost or may be in other hands):
    # the new URL is delivered by hand and the next registration binds a key again.
    rebind: bool = False


@rpc("registry", "cells.decommission", role="admin")
class CellsDecommission(Request[CellView]):
    id: str


@rpc("registry", "cells.audit", read_only=True)
class CellsAudit(Request[list[AuditEntry]]):
    """The cell's audit trail, in the order its agent reported it."""

    id: str
