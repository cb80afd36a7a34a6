"""Typed settings, read once from the environment. A missing or bad value stops the process
with a message that names the variable; nothing else in the project reads os.environ."""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import broker_urls


class ControlPlaneSettings(BaseSettings):
    """What every control-plane process (services and substratectl) needs."""

    model_config = SettingsConfigDict(env_prefix="SUBSTRATE_", extra="ignore", frozen=True)

    amqp_url: str = Field(
        description="broker URL, e.g. amqp://svc-registry:...@host:5672/, or a cluster's node "
        "URLs separated by commas"
    )
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    rpc_timeout_seconds: float = Field(default=5.0, gt=0)
    log_level: str = "INFO"

    @field_validator("amqp_url")
    @classmethod
    def _broker_urls(cls, value: str) -> str:
        broker_urls.split(value)
        return value


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` -> [(host, port)]; ValueError naming the bad part."""
    addresses = []
    for part in (p.strip() for p in value.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{part!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    if not addresses:
        raise ValueError("no sentinel given")
    return addresses


class ServiceSettings(ControlPlaneSettings):
    redis_url: str = Field(
        description="Redis URL, e.g. redis://127.0.0.1:6379/0 (with Sentinel: its database "
        "and password; the host comes from the sentinels)"
    )
    redis_sentinels: str | None = Field(
        default=None,
        description="host:port of each Redis Sentinel, comma-separated: the primary is found "
        "through them and followed across a failover",
    )
    redis_sentinel_master: str = Field(
        default="substrate", description="the name the sentinels monitor the primary under"
    )
    redis_wait_replicas: int | None = Field(
        default=None,
        ge=0,
        description="replicas that must have an operator's write before it is answered (Redis "
        "WAIT); default 1 with Sentinel, 0 without",
    )
    redis_wait_timeout_ms: int = Field(default=1000, gt=0)
    rabbitmq_api_url: str = Field(
        default="http://guest:guest@127.0.0.1:15672",
        description="RabbitMQ management API with credentials",
    )
    admins: str = Field(
        default="op-admin",
        description="broker users, comma-separated, that are admins whatever the operators' "
        "roster says: the first admin, and the way back in if the roster is lost",
    )
    audit_retention_days: float = Field(
        default=400, gt=0, description="how long each service keeps its audit log"
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    metrics_host: str = "127.0.0.1"
    drain_timeout_seconds: float = Field(default=30.0, gt=0)
    handler_retry_seconds: float = Field(
        default=1.0,
        ge=0,
        description="pause before a delivery whose handler failed is tried again, doubled at "
        "each failure after the first (capped at 30 s) until the delivery limit dead-letters it",
    )
    cell_budgets: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="per kind of cell report, [rate a second, burst] a cell may send before "
        'the rest is not applied (JSON, e.g. {"sync": [1, 20]}; a rate of 0 is no limit); '
        "kinds not named keep common/limits.py's defaults",
    )
    # Where the broker's definitions already hold the topology (compose loads them at boot), a
    # least-privileged service user has no configure permission to declare it again.
    declare_topology: bool = Field(
        default=True, description="declare the control-plane exchanges and queues at start"
    )

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: str | None) -> str | None:
        if value is not None:
            sentinel_addresses(value)
        return value

    @property
    def wait_replicas(self) -> int:
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels else 0


S = TypeVar("S", bound=BaseSettings)


def _env_name(settings_cls: type[BaseSettings], field: str) -> str:
    prefix = settings_cls.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def load(settings_cls: type[S]) -> S:
    """Read settings once; on a missing or invalid variable, exit 2 naming it."""
    try:
        return settings_cls()
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"])
            name = _env_name(settings_cls, field)
            problem = "is not set" if err["type"] == "missing" else f"is invalid: {err['msg']}"
            print(f"error: setting {name} {problem}", file=sys.stderr)
        raise SystemExit(2) from None
