"""The service's AWS side, through boto3 (``AWS_ENDPOINT_URL`` points it at a local emulator):
templates in S3, reminders to each organisation's SNS topic, and cfn-lint on a template."""

from __future__ import annotations

import asyncio
import re
from functools import cached_property
from typing import TYPE_CHECKING

import boto3
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient

# SNS topic names: letters, digits, hyphens and underscores, up to 256 characters.
_NOT_IN_TOPIC_NAME = re.compile(r"[^A-Za-z0-9_-]")


def lint(template: str, region: str) -> list[str]:
    """cfn-lint's findings on a template (errors and warnings), one line each: empty if clean."""
    from cfnlint.api import ManualArgs
    from cfnlint.api import lint as run_lint

    found = run_lint(template, config=ManualArgs(regions=[region]))
    return [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in found]


def topic_name(org: str) -> str:
    """The SNS topic an organisation's customers subscribe to."""
    return "substrate-infra-" + _NOT_IN_TOPIC_NAME.sub("-", org)


class InfraAws:
    def __init__(self, region: str, bucket: str) -> None:
        self.region = region
        self.bucket = bucket
        self._topics: dict[str, str] = {}

    @cached_property
    def _s3(self) -> S3Client:
        return boto3.client("s3", region_name=self.region)

    @cached_property
    def _sns(self) -> SNSClient:
        return boto3.client("sns", region_name=self.region)

    def _store(self, key: str, body: str) -> str:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            if self.region == "us-east-1":
                self._s3.create_bucket(Bucket=self.bucket)
            else:
                self._s3.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": self.region},  # type: ignore[typeddict-item]
                )
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode())
        return f"s3://{self.bucket}/{key}"

    def _notify(self, org: str, subject: str, message: str, notice_id: str) -> None:
        arn = self._topics.get(org)
        if arn is None:
            # Idempotent: answers the existing topic's ARN when it is already there.
            arn = self._topics[org] = self._sns.create_topic(Name=topic_name(org))["TopicArn"]
        self._sns.publish(
            TopicArn=arn,
            Subject=subject[:100],
            Message=message,
            MessageAttributes={
                "substrate_notice_id": {"DataType": "String", "StringValue": notice_id}
            },
        )

    async def lint(self, template: str) -> list[str]:
        return await asyncio.to_thread(lint, template, self.region)

    async def store(self, key: str, body: str) -> str:
        """Store a template (the bucket is created if missing); its location."""
        return await asyncio.to_thread(self._store, key, body)

    async def notify(self, org: str, subject: str, message: str, notice_id: str) -> None:
        """Publish to the organisation's topic, created on demand."""
        await asyncio.to_thread(self._notify, org, subject, message, notice_id)
