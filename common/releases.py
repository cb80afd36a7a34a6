"""A release as the contract carries it (in events and desired states): its components, and
what it asks of a cell beyond installing them (health checks, a required step on the path)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.fields import Digest, Version
from common.health import ReleaseHealth


class Component(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    image: Annotated[str, Field(min_length=1, max_length=512)]
    digest: Digest
    requires_maintenance: bool = False


class Release(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Version
    components: tuple[Component, ...] = Field(min_length=1)
    reversible: bool = True
    notes: str = ""
    # Checks the agent runs after applying it (None: the rollout policy's, if any).
    health: ReleaseHealth | None = None
    # A cell behind a required release installs it before anything newer.
    required: bool = False
    # A security release: it reaches a deferred cell once its deadline has passed (by default
    # the policy's security_deadline_days after it is published).
    security: bool = False
    # Every cell must have it by then (an SLA): no deferral holds it past this.
    deadline: AwareDatetime | None = None
