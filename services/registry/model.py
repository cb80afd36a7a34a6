"""The registry's decisions besides a record's transitions (transitions.py): which broker
permissions a cell gets, the URL and stack parameters its customer is given, and when a cell
counts as offline."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from common import broker_urls
from common.messages import CELL_REPORT_KINDS, CELLS_EXCHANGE, command_queue
from common.requests.registry import CellsCreate

# A cell agent needs one connection; the second lets a customer run a diagnostic tool beside
# it. Channels: the agent uses two (publish, commands) and a few transient ones at start.
CELL_MAX_CONNECTIONS = 2
CELL_MAX_CHANNELS = 8


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
    """The URL a cell's agent connects with: the cell-facing broker address (every node's, for
    a cluster), the cell's own user and password, and the control plane's vhost."""
    return broker_urls.with_credentials(base_url, cell_id, password)


def stack_parameters(
    cell: CellsCreate, amqp_url: str, privatelink_service: str, ca_pem: str = ""
) -> dict[str, str]:
    """The CloudFormation parameters of ``cell_agent/bootstrap/cell.yaml`` for this cell; the
    broker's CA (PEM, base64 in the parameter: a parameter holds no newlines) where one is
    configured. The stack reaches the broker through one PrivateLink endpoint (in AWS a load
    balancer in front of a cluster's nodes), so it takes the first address."""
    parts = urlsplit(broker_urls.first(amqp_url))
    ca = {"ControlPlaneCaCertificate": base64.b64encode(ca_pem.encode()).decode()} if ca_pem else {}
    return {
        "CellId": cell.id,
        "Stage": cell.stage,
        "ControlPlaneEndpoint": f"{parts.hostname}:{parts.port or 5672}",
        "ControlPlaneVhost": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        "ControlPlaneServiceName": privatelink_service,
        "AgentPassword": unquote(parts.password or ""),
        **ca,
    }


def offline_cutoff(now: datetime, offline_after: float) -> datetime:
    """Cells whose last heartbeat (by the registry's clock) is at or before this are offline."""
    return now - timedelta(seconds=offline_after)
