"""The infra_compliance service's own settings, beside the common ones."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from common.settings import ServiceSettings


class InfraSettings(ServiceSettings):
    templates_bucket: str = Field(
        default="substrate-templates",
        description="the S3 bucket published templates are stored in (created if missing)",
    )
    aws_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    tick_seconds: float = Field(
        default=1.0,
        gt=0,
        description="the timer loop's longest pause; a timer fires at most this late",
    )
    lease_seconds: float = Field(
        default=15.0,
        gt=0,
        description="the timer lease's TTL: how long a replica waits before taking over",
    )
