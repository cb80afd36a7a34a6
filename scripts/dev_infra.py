"""make dev: a demo cell's bootstrap stack in the local AWS emulator, created from the first
version of the template (so publishing the current one gives the cell a deadline to show).
Arguments: the emulator's URL, make dev's directory, the cell id. Prints the stack's name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3

endpoint, out, cell = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
created = json.loads((out / f"{cell}.json").read_text()) if (out / f"{cell}.json").exists() \
    else {}  # fmt: skip
parameters = created.get("stack_parameters") or {
    "CellId": cell, "Stage": "staging", "ControlPlaneEndpoint": "127.0.0.1:5672",
    "ControlPlaneServiceName": "com.amazonaws.vpce.eu-west-1.vpce-svc-0substrate0dev00",
    "AgentPassword": "demo-password-not-used",
}  # fmt: skip
cfn = boto3.client("cloudformation", endpoint_url=endpoint, region_name="eu-west-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
name = f"substrate-{cell}"
template = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "templates" / "cell-v1.yaml"
cfn.create_stack(
    StackName=name, TemplateBody=template.read_text(),
    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
)  # fmt: skip
print(name)
