"""The registry's own settings, beside the common ones."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from common import broker_urls
from common.settings import ServiceSettings
from common.topology import CellQueues


class RegistrySettings(ServiceSettings):
    offline_after_seconds: float = Field(
        default=90.0, gt=0, description="no heartbeat for this long: offline (3 x 30 s)"
    )
    roster_interval_seconds: float = Field(
        default=300,
        gt=0,
        description="how often the operators' roster is published again (besides each change), "
        "for services that started after it changed",
    )
    policy_interval_seconds: float = Field(
        default=300,
        gt=0,
        description="how often the broker policies that bound queue storage are put again "
        "(at start, then this often: one the management API refused or an operator deleted "
        "comes back)",
    )
    sweep_interval_seconds: float | None = Field(
        default=None, gt=0, description="how often liveness is checked; default offline_after/6"
    )
    credential_grace_seconds: float = Field(
        default=600.0, gt=0, description="how long a rotated credential may go unconfirmed"
    )
    heartbeat_limit_per_second: float = Field(
        default=4.0,
        ge=0,
        description="heartbeats a second one cell may average before the rest are dropped "
        "unapplied (0: no limit); an agent sends one every 30 s by default",
    )
    heartbeat_burst: float = Field(
        default=20.0, ge=1, description="heartbeats one cell may send at once within its limit"
    )
    cell_amqp_url: str | None = Field(
        default=None,
        description="the broker address cells connect to (scheme, host, port, vhost; a "
        "cluster's node URLs separated by commas); default: the control plane's own broker URL",
    )

    cell_queues: CellQueues = Field(
        default="classic",
        description="the type of each cell's command queue: classic (the broker's default "
        "storage version), classic-v2, or quorum on a RabbitMQ cluster, so a node's loss leaves "
        "every cell its queue (fixed once the first cell exists; docs/operating.md says which "
        "to use on RabbitMQ 3.x and 4.x)",
    )

    @field_validator("cell_amqp_url")
    @classmethod
    def _cell_broker_urls(cls, value: str | None) -> str | None:
        if value is not None:
            broker_urls.split(value)
        return value

    cell_ca_file: Path | None = Field(
        default=None,
        description="the CA certificate (PEM) cells verify the broker's certificate with, handed "
        "to each new cell's stack (ControlPlaneCaCertificate) with its credentials",
    )
    privatelink_service_name: str = Field(
        default="com.amazonaws.vpce.eu-west-1.vpce-svc-0substrate0dev00",
        description="the control plane's PrivateLink endpoint service, for cells' stacks",
    )

    @property
    def sweep_interval(self) -> float:
        return self.sweep_interval_seconds or max(self.offline_after_seconds / 6, 0.1)
