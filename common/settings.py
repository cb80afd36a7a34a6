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


class ServiceSettings(ControlPlaneSettings):
    redis_url: str = Field(description="Redis URL, e.g. redis://127.0.0.1:6379/0")
    rabbitmq_api_url: str = Field(
        default="http://guest:guest@127.0.0.1:15672",
        description="RabbitMQ management API with credentials",
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    metrics_host: str = "127.0.0.1"
    drain_timeout_seconds: float = Field(default=30.0, gt=0)
    # Where the broker's definitions already hold the topology (compose loads them at boot), a
    # least-privileged service user has no configure permission to declare it again.
    declare_topology: bool = Field(
        default=True, description="declare the control-plane exchanges and queues at start"
    )


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


def broker_user(amqp_url: str) -> str:
    """The user a broker URL authenticates as: what the broker will insist on as ``user_id``."""
    return broker_urls.user(amqp_url)
