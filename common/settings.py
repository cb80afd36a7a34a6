"""Typed settings, read once from the environment. A missing or bad value stops the process
with a message that names the variable; nothing else in the project reads os.environ."""

from __future__ import annotations

import json
import os
import sys
import types
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common import broker_urls

# Annotations whose value a variable carries as JSON (`{"sync": [1, 20]}`), as pydantic-settings
# reads them; every other value is the variable's text, which pydantic converts in lax mode.
_JSON_VALUED = (dict, list, tuple, set, frozenset)


class EnvSettings(BaseModel):
    """Settings read from environment variables named ``env_prefix`` + the field's name
    (case-insensitively), or one of a field's ``AliasChoices``, with what is passed to the
    constructor taking precedence. The part of pydantic-settings this project used, without the
    tenth of a second its import added to the start of every process (substratectl's above all).
    """

    # populate_by_name: settings copied from another's model_dump() keep an aliased field.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    env_prefix: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, given: Any) -> Any:
        if not isinstance(given, dict):
            return given
        environment = {name.upper(): value for name, value in os.environ.items()}
        values = dict(given)
        for name, field in cls.model_fields.items():
            names = env_names(cls, name)
            key = names[0] if isinstance(field.validation_alias, AliasChoices) else name
            if key in values or name in values:
                continue
            found = next((environment[n] for n in names if n in environment), None)
            if found is not None:
                values[key] = _decoded(field.annotation, found)
        return values


def env_names(settings_cls: type[EnvSettings], field: str) -> list[str]:
    """The variables a field is read from, in order of precedence."""
    alias = settings_cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices]
    return [f"{settings_cls.env_prefix}{field}".upper()]


def _decoded(annotation: Any, text: str) -> Any:
    """The variable's JSON for a field of a container type; left as text where it is not JSON,
    so that validation names the variable and says what it should be."""
    kinds = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    wanted = [get_origin(kind) or kind for kind in (kinds or (annotation,))]
    if not any(isinstance(kind, type) and issubclass(kind, _JSON_VALUED) for kind in wanted):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


class ControlPlaneSettings(EnvSettings):
    """What every control-plane process (services and substratectl) needs."""

    env_prefix: ClassVar[str] = "SUBSTRATE_"

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


S = TypeVar("S", bound=EnvSettings)


def load(settings_cls: type[S]) -> S:
    """Read settings once; on a missing or invalid variable, exit 2 naming it."""
    try:
        return settings_cls()
    except ValidationError as exc:
        for err in exc.errors():
            if not err["loc"]:  # a check across settings names its variables itself
                print(f"error: settings are invalid: {err['msg']}", file=sys.stderr)
                continue
            name = _variable(settings_cls, str(err["loc"][0]))
            problem = "is not set" if err["type"] == "missing" else f"is invalid: {err['msg']}"
            print(f"error: setting {name} {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _variable(settings_cls: type[EnvSettings], key: str) -> str:
    """The variable an error's location (a field's name, or the alias it was read under) names."""
    if key in settings_cls.model_fields:
        return env_names(settings_cls, key)[0]
    return key.upper()
