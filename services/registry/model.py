"""The registry's decisions, pure: what a cell record looks like, which broker permissions a
cell gets, when a cell counts as offline, and what an operator is shown."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from common.messages import CELL_REPORT_KINDS, CELLS_EXCHANGE, CellId, Stage, command_queue

CellStatus = Literal["created", "online", "offline", "decommissioned"]
STATUSES: tuple[CellStatus, ...] = ("created", "online", "offline", "decommissioned")

# A cell agent needs one connection; the second lets a customer run a diagnostic tool beside
# it. Channels: the agent uses two (publish, commands) and a few transient ones at start.
CELL_MAX_CONNECTIONS = 2
CELL_MAX_CHANNELS = 8


class CreateCell(BaseModel):
    """The operator's request to create a cell; errors name the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: CellId
    stage: Stage
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")]
    org: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    aws_account: Annotated[str | None, Field(pattern=r"^[0-9]{12}$")] = None


class CellFilter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: Stage | None = None
    status: CellStatus | None = None


class CellRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str


class CellView(BaseModel):
    """What an operator sees of a cell (``cells list`` and ``cells show``)."""

    model_config = ConfigDict(frozen=True)

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
    decommissioned_at: datetime | None = None
    refused_registrations: list[dict[str, Any]] = Field(default_factory=list)


class BrokerGrant(BaseModel):
    """A cell's broker permissions. ``{username}`` is expanded only in topic permissions, so
    the vhost permissions spell the cell id out, escaped."""

    model_config = ConfigDict(frozen=True)

    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str


def broker_grant(cell_id: str) -> BrokerGrant:
    kinds = "|".join(re.escape(kind) for kind in CELL_REPORT_KINDS)
    return BrokerGrant(
        configure="^$",
        write=f"^{re.escape(CELLS_EXCHANGE)}$",
        read=f"^{re.escape(command_queue(cell_id))}$",
        topic_exchange=CELLS_EXCHANGE,
        topic_write=f"^{{username}}\\.({kinds})$",
        topic_read="^$",
    )


def cell_amqp_url(base_url: str, cell_id: str, password: str) -> str:
    """The URL a cell's agent connects with: the cell-facing broker address, the cell's own
    user and password, and the control plane's vhost."""
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(cell_id, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def stack_parameters(cell: CreateCell, amqp_url: str, privatelink_service: str) -> dict[str, str]:
    """The CloudFormation parameters of ``cell_agent/bootstrap/cell.yaml`` for this cell."""
    parts = urlsplit(amqp_url)
    return {
        "CellId": cell.id,
        "Stage": cell.stage,
        "ControlPlaneEndpoint": f"{parts.hostname}:{parts.port or 5672}",
        "ControlPlaneVhost": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        "ControlPlaneServiceName": privatelink_service,
        "AgentPassword": unquote(parts.password or ""),
    }


def offline_cutoff(now: datetime, offline_after: float) -> datetime:
    """Cells whose last heartbeat (by the registry's clock) is at or before this are offline."""
    return now - timedelta(seconds=offline_after)
