"""Cells as a test makes them: created through substratectl, their agents started as
processes, their bootstrap stacks created in moto's CloudFormation, and reports sent with a
cell's own credentials."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3

from common.messages import CellHeartbeat, CellRegister
from common.requests.registry import CellsShow
from testing.broker import raw_publish
from testing.processes import Proc, Processes
from testing.services import aws_env

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "cell_agent" / "bootstrap" / "cell.yaml"


# The first version of the template, kept to test updating a stack to the current one.
TEMPLATE_V1 = ROOT / "tests" / "fixtures" / "templates" / "cell-v1.yaml"


async def create_cell(procs: Processes, cell_id: str, stage: str = "dedicated") -> dict[str, Any]:
    code, record, err = await procs.ctl(
        "cells", "create", cell_id, "--stage", stage, "--region", "eu-west-1", "--org", "acme"
    )
    assert code == 0, err
    return dict(record)


async def show(procs: Processes, cell_id: str) -> dict[str, Any]:
    code, record, err = await procs.ctl("cells", "show", cell_id)
    assert code == 0, err
    return dict(record)


def create_stack(
    moto: str, name: str, parameters: dict[str, str], template: Path = TEMPLATE_V1
) -> None:
    cfn = boto3.client(
        "cloudformation",
        endpoint_url=moto,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    cfn.create_stack(
        StackName=name,
        TemplateBody=template.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
    )
    cfn.get_waiter("stack_create_complete").wait(StackName=name, WaiterConfig={"Delay": 1})


async def start_agent(
    procs: Processes,
    moto: str,
    cell_id: str,
    url: str,
    state: Path,
    *,
    heartbeat: str = "0.5",
    stack: str | None = None,
    metrics_port: int = 0,
    **env: str,
) -> Proc:
    settings = {
        "CELL_ID": cell_id,
        "CELL_AMQP_URL": url,
        "CELL_STATE_DIR": str(state),
        "CELL_HEARTBEAT_SECONDS": heartbeat,
        "CELL_SYNC_SECONDS": "5",
        "CELL_METRICS_PORT": str(metrics_port),
        **aws_env(moto),
    }
    if stack:
        settings["CELL_STACK_NAME"] = stack
    return await procs.start(
        f"agent-{cell_id}-{len(procs.running)}", "cell-agent", "run", **{**settings, **env}
    )


async def shown_if(
    procs: Processes, cell_id: str, check: Callable[[dict[str, Any]], object]
) -> dict[str, Any] | None:
    """The cell's record as substratectl shows it (``cells show --json``) if ``check`` holds of
    it, else None: for a bounded poll. Looked at from the test's process first (the same
    answer, ``Processes.look``), so substratectl runs only once the look says it will do, or
    when the look cannot answer."""
    look = await procs.look(CellsShow(id=cell_id))
    if look is not None and not check(look.model_dump(mode="json", by_alias=True)):
        return None
    record = await show(procs, cell_id)
    return record if check(record) else None


async def status_is(procs: Processes, cell_id: str, status: str) -> dict[str, Any] | None:
    return await shown_if(procs, cell_id, lambda r: r["status"] == status)


def new_cell_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def heartbeat(cell_id: str, seq: int = 1) -> CellHeartbeat:
    return CellHeartbeat(cell_id=cell_id, seq=seq, sent_at=datetime.now(UTC), agent_version="t")


async def register_as_cell(url: str, cell: str) -> None:
    """Register ``cell`` with its own credentials, as its agent would."""
    msg = CellRegister(
        cell_id=cell,
        seq=1,
        sent_at=datetime.now(UTC),
        agent_version="1",
        aws_account_id="123456789012",
        region="eu-west-1",
        incarnation="i",
    )
    body = msg.model_dump_json().encode()
    await raw_publish(
        url, "substrate.cells", f"{cell}.register", body, type=msg.wire_name, user_id=cell
    )
