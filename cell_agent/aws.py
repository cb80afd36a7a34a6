"""The agent's AWS calls, through boto3. AWS_ENDPOINT_URL points boto3 at a local emulator."""

from __future__ import annotations

import asyncio

import boto3


class CellAws:
    def __init__(self, region: str) -> None:
        self.region = region

    def _account_id(self) -> str:
        return str(boto3.client("sts", region_name=self.region).get_caller_identity()["Account"])

    def _template_version(self, stack_name: str) -> str | None:
        cfn = boto3.client("cloudformation", region_name=self.region)
        stacks = cfn.describe_stacks(StackName=stack_name)["Stacks"]
        for output in stacks[0].get("Outputs", []) if stacks else []:
            if output.get("OutputKey") == "TemplateVersion":
                return str(output.get("OutputValue"))
        return None

    async def account_id(self) -> str:
        return await asyncio.to_thread(self._account_id)

    async def template_version(self, stack_name: str) -> str | None:
        return await asyncio.to_thread(self._template_version, stack_name)
