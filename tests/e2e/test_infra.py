"""The cell's AWS side end to end: a mandatory infrastructure update with its deadline,
reminders to the organisation's SNS topic (read back through a subscribed SQS queue), the SLA
hold and the catch-up, fired once across a kill and two replicas; and debug access that only
the customer can open. Everything AWS is moto's server, through boto3."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis.asyncio as aioredis

from common.bus.errors import RemoteError
from common.bus.rabbit_bus import RabbitBus
from common.messages import EVENTS_EXCHANGE
from common.topology import CELL_COMMANDS_DEAD, SERVICE_QUEUES, Binding, Topology, consuming_queue
from testing.broker import raw_publish, read_all
from testing.cells import TEMPLATE, TEMPLATE_V1, create_stack, new_cell_id, show, shown_if
from testing.cells import start_agent as start_cell_agent
from testing.fleet import Fleet
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import BIN, Proc, Processes, start_registry, start_rollout
from testing.services import Services, aws_env

ORG = "acme"


def client(moto: str, name: str) -> Any:
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     region_name="eu-west-1")  # fmt: skip
    return session.client(name, endpoint_url=moto)  # type: ignore[call-overload]


@dataclass
class InfraCell:
    id: str
    url: str
    stack: str
    state: Path
    agent: Proc
    env: dict[str, str]


class Infra:
    """The control plane with infra_compliance, cells with stacks and agents, and taps on the
    organisation's SNS topic (an SQS queue) and on the infra events."""

    def __init__(self, procs: Processes, moto: str, root: Path, bus: RabbitBus) -> None:
        self.procs, self.moto, self.root, self.bus = procs, moto, root, bus
        self.bucket = f"templates-{uuid.uuid4().hex[:8]}"
        self.events = f"test.infra.{root.name}"[:200]
        self.replicas: list[Proc] = []
        self.queue_url = ""

    async def start_service(self) -> Proc:
        port = free_port()
        proc = await self.procs.start(
            f"infra-{len(self.replicas)}", "substrate-infra-compliance",
            SUBSTRATE_TEMPLATES_BUCKET=self.bucket, SUBSTRATE_TICK_SECONDS="0.2",
            SUBSTRATE_LEASE_SECONDS="2", SUBSTRATE_METRICS_PORT=str(port), **aws_env(self.moto),
        )  # fmt: skip
        self.replicas.append(proc)

        async def answers() -> bool:
            code, _, _ = await self.procs.ctl("infra", "list")
            return code == 0

        await eventually(answers, timeout=30, interval=0.3, what="infra_compliance answering")
        return proc

    async def taps(self) -> None:
        await self.bus.declare(
            Topology((), consuming_queue(self.events, Binding(EVENTS_EXCHANGE, "infra.#")))
        )
        sns, sqs = client(self.moto, "sns"), client(self.moto, "sqs")
        topic = sns.create_topic(Name=f"substrate-infra-{ORG}")["TopicArn"]
        self.queue_url = sqs.create_queue(QueueName=f"customer-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn["Attributes"]["QueueArn"])
        self._notices: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []

    def notices(self) -> list[dict[str, Any]]:
        """Every SNS message the customer's queue received (kept: reading removes them)."""
        sqs = client(self.moto, "sqs")
        while True:
            got = sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
            messages = got.get("Messages", [])
            if not messages:
                return list(self._notices)
            for m in messages:
                self._notices.append(json.loads(m["Body"]))
                sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"])

    async def infra_events(self) -> list[dict[str, Any]]:
        for m in await read_all(self.procs.services.amqp_url, self.events):
            self._events.append({"type": m.type, **json.loads(m.body)})
        return list(self._events)

    async def add_cell(self, *, template: Path = TEMPLATE_V1, stage: str = "staging",
                       **env: str) -> InfraCell:  # fmt: skip
        cell_id = new_cell_id()
        code, created, err = await self.procs.ctl(
            "cells", "create", cell_id, "--stage", stage, "--region", "eu-west-1", "--org", ORG
        )
        assert code == 0, err
        stack = f"substrate-{cell_id}"
        await asyncio.to_thread(create_stack, self.moto, stack, created["stack_parameters"],
                                template)  # fmt: skip
        env = {"CELL_SYNC_SECONDS": "1", **env}
        state = self.root / cell_id
        extra: dict[str, Any] = env  # CELL_* variables only
        agent = await start_cell_agent(self.procs, self.moto, cell_id, created["amqp_url"], state,
                                       stack=stack, **extra)  # fmt: skip
        cell = InfraCell(cell_id, created["amqp_url"], stack, state, agent, env)
        await eventually(lambda: _shows(self.procs, cell_id, "status", "online"), timeout=30,
                         interval=0.3, what=f"{cell_id} online")  # fmt: skip
        return cell

    async def restart_agent(self, cell: InfraCell) -> None:
        await self.procs.stop(cell.agent)
        extra: dict[str, Any] = cell.env
        cell.agent = await start_cell_agent(self.procs, self.moto, cell.id, cell.url, cell.state,
                                            stack=cell.stack, **extra)  # fmt: skip

    async def agent_cli(self, cell: InfraCell, *args: str) -> tuple[int, Any, str]:
        """``cell-agent --json ARGS`` as the customer runs it beside the agent."""
        env = self.procs.env(CELL_ID=cell.id, CELL_AMQP_URL=cell.url,
                             CELL_STATE_DIR=str(cell.state), CELL_STACK_NAME=cell.stack,
                             **aws_env(self.moto))  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            str(BIN / "cell-agent"), "--json", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, json.loads(out) if out.strip() else None, err.decode()

    async def compliance(self, cell: InfraCell) -> dict[str, Any]:
        code, view, err = await self.procs.ctl("infra", "status", "--cell", cell.id)
        assert code == 0, err
        return dict(view["cells"][0])

    async def state_is(self, cell: InfraCell, state: str) -> dict[str, Any] | None:
        row = await self.compliance(cell)
        return row if row["state"] == state else None


async def _shows(
    procs: Processes, cell_id: str, field: str, value: object
) -> dict[str, Any] | None:
    return await shown_if(procs, cell_id, lambda r: r.get(field) == value)


@pytest.fixture
async def infra(procs: Processes, services: Services, moto: str, tmp_path: Path,
                bus: RabbitBus) -> AsyncIterator[Infra]:  # fmt: skip
    """A registry, a rollout service and infra_compliance that know only this test's cells and
    templates (the services' keys and queues are emptied first)."""
    redis = aioredis.from_url(services.redis_url)
    keys = [k async for k in redis.scan_iter("infra_compliance:*")]
    keys += [k async for k in redis.scan_iter("rollout:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
    for service in ("infra_compliance", "rollout"):
        for queue in SERVICE_QUEUES[service]:
            await services.api.call("DELETE", f"/queues/{services.vhost}/{queue.name}/contents")
    await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="60")
    env = Infra(procs, moto, tmp_path, bus)
    await env.taps()
    yield env


def reminders_of(notices: list[dict[str, Any]], cell_id: str) -> list[str]:
    return sorted(n["Message"].split(". Reminder ")[1][:6] for n in notices
                  if "Reminder" in n["Message"] and f"Cell {cell_id} " in n["Message"])  # fmt: skip


def breaches_of(notices: list[dict[str, Any]], cell_id: str) -> int:
    return sum(f"cell {cell_id} is out of SLA" in n["Subject"] for n in notices)


@pytest.mark.e2e
async def test_a_template_update_with_reminders_a_hold_and_the_catch_up(
    infra: Infra, procs: Processes, moto: str, tmp_path: Path, bus: RabbitBus
) -> None:
    await start_rollout(procs)
    (tmp_path / "policy.yaml").write_text("soak_seconds: {staging: 0, saas: 0, dedicated: 0}\n")
    assert (await procs.ctl("rollout", "policy", "set", str(tmp_path / "policy.yaml")))[0] == 0
    await infra.start_service()
    quick, late = await infra.add_cell(), await infra.add_cell()
    for cell in (quick, late):
        assert (await show(procs, cell.id))["infra_template_version"] == "1"

    # Long enough for the quick cell's customer to apply it on a busy machine (with 20 s, one
    # run's quick cell fell out of SLA before its apply was heard).
    code, published, err = await procs.ctl("infra", "publish", "3", "--template", str(TEMPLATE),
                                           "--grace", "30s")  # fmt: skip
    assert code == 0, err
    assert published["version"] == "3" and published["location"].startswith(f"s3://{infra.bucket}/")
    code, listed, _ = await procs.ctl("infra", "list")
    assert [t["version"] for t in listed] == ["3"]

    # The customer of the quick cell sees what is required, previews it and applies it.
    async def required(cell: InfraCell) -> dict[str, Any] | None:
        code, shown, _ = await infra.agent_cli(cell, "infra", "status")
        return shown if code == 0 and shown["required_version"] == "3" else None

    status = await eventually(lambda: required(quick), timeout=20, interval=0.5)
    assert status["status"] == "pending" and status["template_version"] == "1"
    assert status["location"] == published["location"] and status["deadline"]
    code, preview, err = await infra.agent_cli(quick, "infra", "preview")
    assert code == 0, err
    assert preview["required_version"] == "3" and preview["change_set"].startswith("substrate-")
    stack = client(moto, "cloudformation").describe_stacks(StackName=quick.stack)["Stacks"][0]
    assert {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}["TemplateVersion"] == "1"
    code, applied, err = await infra.agent_cli(quick, "infra", "apply")
    assert code == 0, err
    assert applied["template_version"] == "3"
    await eventually(lambda: _shows(procs, quick.id, "infra_template_version", "3"), timeout=20,
                     interval=0.3, what="the next heartbeat reports 3")  # fmt: skip
    await eventually(lambda: infra.state_is(quick, "compliant"), timeout=20, interval=0.3)

    # The late cell is reminded three times, then falls out of SLA at its deadline.
    await eventually(lambda: infra.state_is(late, "out_of_sla"), timeout=60, interval=0.3)
    notices = await eventually(lambda: breaches_of(infra.notices(), late.id) and infra.notices(),
                               timeout=20, interval=0.3)  # fmt: skip
    assert reminders_of(notices, late.id) == ["1 of 3", "2 of 3", "3 of 3"]
    assert breaches_of(notices, late.id) == 1 and breaches_of(notices, quick.id) == 0
    events = await infra.infra_events()
    reminders = [(e["cell_id"], e["reminder"]) for e in events if e["type"] == "infra.reminder.v1"]
    assert sorted(r for c, r in reminders if c == late.id) == [1, 2, 3], "each once, in order"
    assert all(e["org"] == ORG and e["location"] == published["location"] for e in events
               if e["type"] == "infra.reminder.v1")  # fmt: skip
    record = await show(procs, late.id)
    assert record["compliance"] == "out_of_sla" and record["compliance_deadline"]

    # Held: a new release reaches the compliant cell, not the other.
    fleet = Fleet(procs, moto, tmp_path, bus)
    version = await fleet.publish(1)
    await eventually(lambda: _shows(procs, quick.id, "installed_release", version), timeout=40,
                     interval=0.3, what="the release on the compliant cell")  # fmt: skip
    code, why, _ = await procs.ctl("rollout", "explain", late.id)
    assert why["reason"] == "held" and why["hold_deadline"]
    assert "past its deadline" in why["explanation"]
    assert (await show(procs, late.id))["installed_release"] is None

    # The late cell applies it: compliant again, and it catches up to the release.
    code, _, err = await infra.agent_cli(late, "infra", "apply")
    assert code == 0, err
    await eventually(lambda: infra.state_is(late, "compliant"), timeout=30, interval=0.3)
    await eventually(lambda: _shows(procs, late.id, "installed_release", version), timeout=40,
                     interval=0.3, what="the late cell catches up")  # fmt: skip
    code, view, _ = await procs.ctl("infra", "status")
    assert view["summary"]["out_of_sla"] == 0 and view["summary"]["compliant"] == 2


@pytest.mark.e2e
async def test_each_reminder_and_the_breach_fire_once_across_a_kill_and_two_replicas(
    infra: Infra, procs: Processes
) -> None:
    first = await infra.start_service()
    await infra.start_service()
    cell = await infra.add_cell()
    code, _, err = await procs.ctl("infra", "publish", "3", "--template", str(TEMPLATE),
                                   "--grace", "14s")  # fmt: skip
    assert code == 0, err
    # After the first reminder (7 s before the deadline), a replica dies mid-flight; a third
    # starts. The lease passes on; nothing fires twice and nothing is skipped.
    await eventually(lambda: reminders_of(infra.notices(), cell.id) == ["1 of 3"], timeout=20,
                     interval=0.2, what="the first reminder")  # fmt: skip
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    await infra.start_service()
    await eventually(lambda: infra.state_is(cell, "out_of_sla"), timeout=40, interval=0.3)
    notices = await eventually(lambda: breaches_of(infra.notices(), cell.id) and infra.notices(),
                               timeout=20, interval=0.3)  # fmt: skip
    await asyncio.sleep(1)  # a repeat would come within a tick; none may
    notices = infra.notices()
    assert reminders_of(notices, cell.id) == ["1 of 3", "2 of 3", "3 of 3"]
    assert breaches_of(notices, cell.id) == 1
    events = await infra.infra_events()
    assert sorted(e["reminder"] for e in events if e["type"] == "infra.reminder.v1") == [1, 2, 3]
    out = [e for e in events if e["type"] == "infra.compliance-changed.v1"
           and e["status"] == "out_of_sla"]  # fmt: skip
    assert len(out) == 1
    assert (await infra.compliance(cell))["reminders_sent"] == 3


@pytest.mark.e2e
async def test_bad_templates_and_graces_are_refused_and_nothing_is_written(
    infra: Infra, procs: Processes, moto: str, tmp_path: Path
) -> None:
    await infra.start_service()
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("AWS::EC2::VPC\n", "AWS::EC2::Vpcx\n", 1))
    for args, needle in (
        (["3", "--template", str(broken)], "fails cfn-lint: E3006"),
        (["3", "--template", str(TEMPLATE), "--grace", "soon"], "grace: 'soon' is not a duration"),
        (["x3", "--template", str(TEMPLATE)], "version: String should match pattern"),
        (["4", "--template", str(TEMPLATE)], "TemplateVersion output is '3', not '4'"),
        (["3", "--template", str(tmp_path / "missing.yaml")], "cannot read"),
    ):
        code, out, err = await procs.ctl("infra", "publish", *args)
        assert code == 1 and needle in err, (args, err)
        assert out == {"error": err.strip().removeprefix("error: ")}
        assert "\n" not in err.strip(), "one line"
    code, _, err = await procs.ctl("infra", "publish", "3", "--template", str(TEMPLATE))
    assert code == 0, err
    for version, needle in (("3", "is already published"), ("2", "is older than 3")):
        code, _, err = await procs.ctl("infra", "publish", version, "--template", str(TEMPLATE))
        assert code == 1 and needle in err, err
    code, listed, _ = await procs.ctl("infra", "list")
    assert [t["version"] for t in listed] == ["3"]
    objects = client(moto, "s3").list_objects_v2(Bucket=infra.bucket).get("Contents", [])
    assert len(objects) == 1, "only the published template is stored"


# -- debug access ---------------------------------------------------------------------------------


def debug_roles(moto: str) -> dict[str, dict[str, Any]]:
    iam = client(moto, "iam")
    return {r["RoleName"]: r for r in iam.list_roles(PathPrefix="/substrate-debug/")["Roles"]}


@pytest.mark.e2e
async def test_debug_access_is_opened_by_the_customer_expires_and_is_audited(
    infra: Infra, procs: Processes, moto: str
) -> None:
    cell = await infra.add_cell(template=TEMPLATE, CELL_DEBUG_CHECK_SECONDS="0.5")
    before = set(debug_roles(moto))
    for args, needle in (
        (["--hours", "73", "--reason", "incident"], "cap of 72 hours"),
        (["--hours", "2", "--reason", "   "], "--reason: say why"),
        (["--hours", "0", "--reason", "incident"], "is not between 0"),
    ):
        code, _, err = await infra.agent_cli(cell, "debug-access", "grant", *args)
        assert code == 1 and needle in err, (args, err)
    assert set(debug_roles(moto)) == before, "a refused grant creates nothing"

    # A grant of a few seconds: only the support principal, only until the expiry.
    code, grant, err = await infra.agent_cli(
        cell, "debug-access", "grant", "--hours", "0.004", "--reason", "incident 42"
    )
    assert code == 0, err
    role = debug_roles(moto)[grant["role_name"]]
    statement = role["AssumeRolePolicyDocument"]["Statement"]
    assert len(statement) == 1
    stack = client(moto, "cloudformation").describe_stacks(StackName=cell.stack)["Stacks"][0]
    principal = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}[
        "SupportPrincipal"]  # fmt: skip
    assert statement[0]["Principal"] == {"AWS": principal}
    assert statement[0]["Condition"]["DateLessThan"]["aws:CurrentTime"].startswith(
        grant["expires_at"][:16]
    )
    # Only presenting the cell's external id (the confused deputy), within a read-only boundary.
    external = {"sts:ExternalId": f"substrate:{cell.id}"}
    assert statement[0]["Condition"]["StringEquals"] == external
    assert grant["external_id"] == f"substrate:{cell.id}"
    made = client(moto, "iam").get_role(RoleName=grant["role_name"])["Role"]
    assert made["PermissionsBoundary"]["PermissionsBoundaryArn"].endswith("/ReadOnlyAccess")
    attached = client(moto, "iam").list_attached_role_policies(RoleName=grant["role_name"])
    assert [p["PolicyName"] for p in attached["AttachedPolicies"]] == ["ReadOnlyAccess"]

    # The agent restarts before the expiry; the role is still deleted when it expires.
    await infra.restart_agent(cell)
    await eventually(lambda: grant["role_name"] not in debug_roles(moto), timeout=30,
                     interval=0.3, what="the expired role deleted")  # fmt: skip

    # Another grant, revoked by the customer.
    code, second, err = await infra.agent_cli(
        cell, "debug-access", "grant", "--hours", "1", "--reason", "follow-up"
    )
    assert code == 0, err
    code, listed, _ = await infra.agent_cli(cell, "debug-access", "list")
    assert [g["role_name"] for g in listed] == [second["role_name"]]
    code, revoked, err = await infra.agent_cli(cell, "debug-access", "revoke")
    assert code == 0 and revoked["revoked"] == [second["role_arn"]], err
    assert second["role_name"] not in debug_roles(moto)

    async def audit() -> list[Any] | None:
        code, lines, _ = await procs.ctl("cells", "audit", cell.id)
        return lines if code == 0 and len(lines) == 4 else None

    lines = await eventually(audit, timeout=20, interval=0.3, what="four audit lines")
    assert [(a["action"], a["role_arn"]) for a in lines] == [
        ("granted", grant["role_arn"]), ("expired", grant["role_arn"]),
        ("granted", second["role_arn"]), ("revoked", second["role_arn"]),
    ]  # fmt: skip
    assert lines[0]["reason"] == "incident 42" and lines[0]["granted_by"]
    assert [a["seq"] for a in lines] == sorted(a["seq"] for a in lines)


@pytest.mark.e2e
async def test_no_message_of_the_cell_or_the_control_plane_opens_access(
    infra: Infra, procs: Processes, moto: str, services: Services, bus: RabbitBus
) -> None:
    cell = await infra.add_cell(template=TEMPLATE)
    before = set(debug_roles(moto))
    # The cell claims a grant: it is only recorded, as a claim; nothing is created.
    claim = {"cell_id": cell.id, "seq": 10_000, "sent_at": "2026-11-26T12:00:00+00:00",
             "action": "granted", "role_arn": "arn:aws:iam::123456789012:role/x"}  # fmt: skip
    await raw_publish(
        cell.url,
        "substrate.cells",
        f"{cell.id}.debug-access",
        json.dumps(claim).encode(),
        type="cell.debug-access.v1",
        user_id=cell.id,
    )
    # The control plane has no command for it: one made up is dead-lettered by the agent.
    await raw_publish(services.amqp_url, "substrate.commands", cell.id,
                      json.dumps({"cell_id": cell.id, "hours": 72}).encode(),
                      type="command.debug-access.v1")  # fmt: skip
    # No service answers a request for it.
    for service, method in (
        ("registry", "cells.debug_access"),
        ("registry", "cells.grant"),
    ):
        with pytest.raises(RemoteError, match="has no method"):
            await bus.request(service, method, {"id": cell.id, "hours": 72}, timeout=10)

    async def dead_lettered() -> bool:
        dead = await read_all(services.amqp_url, CELL_COMMANDS_DEAD)
        return any(m.type == "command.debug-access.v1" for m in dead)

    await eventually(dead_lettered, timeout=15, interval=0.3, what="the made-up command dead")
    await asyncio.sleep(2)  # the agent checks for expiry every 0.5 s; nothing may appear
    assert set(debug_roles(moto)) == before, "no role was created"
