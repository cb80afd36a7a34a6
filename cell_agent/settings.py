"""The agent's settings: CELL_* plus the standard AWS_* variables, read once."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from common import broker_urls
from common.fields import CellId
from common.settings import EnvSettings


class AgentSettings(EnvSettings):
    env_prefix: ClassVar[str] = "CELL_"

    id: CellId
    amqp_url: str = Field(
        description="the URL `substratectl cells create` printed (for a cluster, several "
        "separated by commas)"
    )
    ca_file: Path | None = Field(
        default=None,
        description="the CA the broker's certificate must verify against (amqps:// only; "
        "unset: the system's CAs)",
    )
    state_dir: Path
    heartbeat_seconds: float = Field(default=30.0, gt=0)
    sync_seconds: float = Field(default=60.0, gt=0)
    stack_name: str | None = Field(
        default=None, description="the cell's CloudFormation stack, for its template version"
    )
    # The agent serves metrics, health and (later) its maintenance gate on loopback only: a
    # cell never listens on its network.
    metrics_port: int = Field(default=9180, ge=0, le=65535)
    applier: Literal["local", "command"] = Field(
        default="local", description="how components are applied (see docs/agent.md)"
    )
    apply_command: str | None = Field(
        default=None, description="with CELL_APPLIER=command: run once per component"
    )
    progress_report_seconds: float = Field(
        default=2.0,
        ge=0,
        description="an upgrade's phase is reported once it has lasted this long (its outcome "
        "at once); 0: every phase at once",
    )
    maintenance_minutes: float = Field(
        default=15.0, gt=0, description="maintenance window, renewed while an update runs"
    )
    support_principal: str | None = Field(
        default=None,
        description="the vendor's support principal debug access is for, when the cell's "
        "stack has no SupportPrincipal parameter (a stack's parameter wins)",
    )
    debug_max_hours: float = Field(
        default=72.0, gt=0, description="the longest debug access a customer may grant"
    )
    debug_check_seconds: float = Field(
        default=60.0, gt=0, description="how often expired debug access is deleted"
    )
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    log_level: str = "INFO"
    aws_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )

    @field_validator("amqp_url")
    @classmethod
    def _broker_urls(cls, value: str) -> str:
        broker_urls.split(value)
        return value

    @model_validator(mode="after")
    def _a_ca_needs_tls(self) -> AgentSettings:
        if self.ca_file is not None and not broker_urls.is_tls(self.amqp_url):
            raise ValueError("CELL_CA_FILE is set but CELL_AMQP_URL is not amqps://")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"CELL_CA_FILE {self.ca_file} is not a readable file")
        return self

    @model_validator(mode="after")
    def _command_applier_needs_a_command(self) -> AgentSettings:
        if self.applier == "command" and not self.apply_command:
            raise ValueError("CELL_APPLIER=command needs CELL_APPLY_COMMAND")
        return self
