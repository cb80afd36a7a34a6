"""Cells end to end, with real processes: substratectl, the registry, cell agents, moto."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from aiormq.exceptions import ProbableAuthenticationError

from common import broker_urls
from common.messages import CellRegister, command_queue
from testing.broker import raw_publish
from testing.cells import (
    create_cell,
    create_stack,
    new_cell_id,
    show,
    shown_if,
    start_agent,
    status_is,
)
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import (
    Proc,
    Processes,
    Registry,
    http_get,
    listening_addresses,
    start_registry,
)
from testing.services import Services


@dataclass
class Onboarded:
    cell_id: str
    created: dict[str, Any]
    agent: Proc


async def onboard(procs: Processes, moto: str, state_root: Path, n: int = 1) -> list[Onboarded]:
    """Create ``n`` cells, start an agent for each, and wait until all are online."""
    cells = []
    for _ in range(n):
        cell = new_cell_id()
        created = await create_cell(procs, cell)
        agent = await start_agent(procs, moto, cell, created["amqp_url"], state_root / cell)
        cells.append(Onboarded(cell, created, agent))
    for c in cells:
        await eventually(partial(status_is, procs, c.cell_id, "online"), timeout=20, interval=0.3)
    return cells


async def cell_connections(services: Services, cell_id: str) -> list[dict[str, Any]]:
    return await services.api.connections(user=cell_id)


@pytest.mark.e2e
async def test_create_start_agent_and_see_it_online(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path
) -> None:
    cell = new_cell_id()
    created = await create_cell(procs, cell)
    assert created["status"] == "created"
    assert set(created["stack_parameters"]) >= {"CellId", "Stage", "ControlPlaneEndpoint"}

    # The customer creates the bootstrap stack with the parameters they were given.
    stack = f"substrate-{cell}"
    await asyncio.to_thread(create_stack, moto, stack, created["stack_parameters"])

    port = free_port()
    agent = await start_agent(
        procs, moto, cell, created["amqp_url"], tmp_path / "state", stack=stack, metrics_port=port
    )
    online = await eventually(
        lambda: status_is(procs, cell, "online"), timeout=20, interval=0.3, what="cell online"
    )
    assert online["aws_account_id"] == "123456789012"
    assert online["stack_name"] == stack
    assert online["infra_template_version"] == "1"
    assert online["agent_version"]
    assert online["installed_release"] is None  # nothing installed before the first release
    assert online["registered_at"] and online["last_heartbeat_at"]

    code, cells, _ = await procs.ctl("cells", "list", "--status", "online")
    assert code == 0 and cell in [c["id"] for c in cells]

    # The agent's own view: healthy, connected, heartbeating, and listening on loopback only.
    status, health = await http_get(port, "/healthz")
    assert status == 200 and json.loads(health)["connected"] is True
    _, metrics = await http_get(port, "/metrics")
    assert "cell_agent_connected 1.0" in metrics
    assert "cell_agent_last_heartbeat_timestamp_seconds" in metrics
    assert listening_addresses(agent.process.pid) == [("127.0.0.1", port)]
    assert await procs.stop(agent) == 0


@pytest.mark.e2e
async def test_offline_after_silence_and_online_again(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services
) -> None:
    (onboarded,) = await onboard(procs, moto, tmp_path)
    cell, agent = onboarded.cell_id, onboarded.agent

    # Freeze the agent: its connection stays open but it goes silent, as a cut-off cell does.
    agent.process.send_signal(19)  # SIGSTOP
    try:
        offline = await eventually(
            lambda: status_is(procs, cell, "offline"), timeout=15, interval=0.3, what="offline"
        )
        assert offline["last_heartbeat_at"]
    finally:
        agent.process.send_signal(18)  # SIGCONT
    await eventually(lambda: status_is(procs, cell, "online"), timeout=15, interval=0.3)
    assert await registry.metric("substrate_cell_liveness_transitions_total", to="offline") >= 1
    assert await registry.metric("substrate_cell_liveness_transitions_total", to="online") >= 1


@pytest.mark.e2e
@pytest.mark.fault
async def test_second_account_is_refused_and_reported(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services
) -> None:
    (onboarded,) = await onboard(procs, moto, tmp_path)
    cell, created = onboarded.cell_id, onboarded.created
    await procs.stop(onboarded.agent)

    # The same credentials used from another AWS account (a copied stack, a leaked secret).
    forged = CellRegister(
        cell_id=cell, seq=10_000, sent_at=datetime.now(UTC), agent_version="x",
        aws_account_id="210987654321", region="eu-west-1", incarnation="elsewhere",
    )  # fmt: skip
    await raw_publish(
        created["amqp_url"], "substrate.cells", f"{cell}.register",
        forged.model_dump_json().encode(), type=forged.wire_name, user_id=cell,
    )  # fmt: skip
    record = await eventually(
        lambda: _refused(procs, cell), timeout=15, interval=0.3, what="refusal recorded"
    )
    assert record["aws_account_id"] == "123456789012"
    assert record["refused_registrations"][0]["aws_account_id"] == "210987654321"
    assert await registry.metric("substrate_registrations_total", outcome="refused_account") >= 1


async def _refused(procs: Processes, cell: str) -> dict[str, Any] | None:
    return await shown_if(procs, cell, lambda r: r["refused_registrations"])


@pytest.mark.e2e
@pytest.mark.fault
async def test_decommission_closes_the_agent_and_it_cannot_come_back(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services
) -> None:
    (onboarded,) = await onboard(procs, moto, tmp_path)
    cell, created, agent = onboarded.cell_id, onboarded.created, onboarded.agent
    await eventually(lambda: cell_connections(services, cell), timeout=15, what="agent listed")

    code, record, err = await procs.ctl("cells", "decommission", cell, "--yes")
    assert code == 0, err
    assert record["status"] == "decommissioned" and record["decommissioned_at"]
    await eventually(lambda: _no_connections(services, cell), timeout=10, what="agent disconnected")
    with pytest.raises(ProbableAuthenticationError):
        await aio_pika.connect(created["amqp_url"])
    # The agent keeps retrying on its own (every 5 s); over two of its attempts it stays out.
    for _ in range(3):
        assert await _no_connections(services, cell)
        await asyncio.sleep(2)
    record = await show(procs, cell)
    assert record["status"] == "decommissioned"
    code, _, err = await procs.ctl("cells", "create", cell, "--stage", "saas", "--region",
                                   "eu-west-1", "--org", "acme")  # fmt: skip
    assert code == 1 and "decommissioned; ids are not reused" in err
    # A plain list leaves it out; asked for by status, it is there.
    code, listed, err = await procs.ctl("cells", "list")
    assert code == 0 and cell not in {c["id"] for c in listed}, err
    code, listed, err = await procs.ctl("cells", "list", "--status", "decommissioned")
    assert code == 0 and cell in {c["id"] for c in listed}, err
    # Irreversible: nothing is done without --yes where nobody can be asked.
    code, _, err = await procs.ctl("cells", "decommission", cell)
    assert code == 2 and "--yes" in err
    # Cut off for good, the agent still shuts down cleanly when told to.
    assert await procs.stop(agent, timeout=25) == 0


async def _no_connections(services: Services, cell: str) -> bool:
    return not await cell_connections(services, cell)


@pytest.mark.e2e
@pytest.mark.fault
async def test_rotation_evicts_the_old_secret_and_the_agent_carries_on_with_the_new_one(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services
) -> None:
    """Rotation evicts: once the agent confirms its new secret, every connection opened with
    the old one is closed (a thief's too, which before stayed up and kept publishing), and the
    agent carries on over a new connection with the new secret."""
    (onboarded,) = await onboard(procs, moto, tmp_path)
    cell, created = onboarded.cell_id, onboarded.created
    (before,) = await eventually(lambda: cell_connections(services, cell), timeout=15)
    thief = await aio_pika.connect(created["amqp_url"])

    code, rotated, err = await procs.ctl("cells", "rotate-credentials", cell)
    assert code == 0, err
    confirmed = await eventually(
        lambda: _confirmed(procs, cell, rotated["credential_id"]), timeout=15, interval=0.3
    )
    assert confirmed["status"] == "online"
    await eventually(lambda: _closed(thief), timeout=15, what="the thief's connection closed")
    (after,) = await eventually(
        lambda: _connections_but(services, cell, before["name"]), timeout=15,
        what="the agent connected again with its new secret",
    )  # fmt: skip
    assert after["name"] != before["name"]

    with pytest.raises(ProbableAuthenticationError):
        await aio_pika.connect(created["amqp_url"])
    fresh = await aio_pika.connect(rotated["amqp_url"])
    await fresh.close()

    # Heartbeats keep flowing on the rotated connection.
    first = (await show(procs, cell))["last_heartbeat_at"]
    await eventually(
        lambda: _heartbeat_after(procs, cell, first), timeout=10, interval=0.3, what="heartbeat"
    )


@pytest.mark.e2e
@pytest.mark.fault
async def test_a_reader_of_the_cells_queue_never_learns_the_rotated_secret(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path, services: Services
) -> None:
    """Whoever holds the cell's old URL can read its command queue: the rotation command it
    takes there carries the new secret sealed to the agent's key, which opens nothing. (It
    carried the password in the clear: the thief confirmed it and logged in.)"""
    (onboarded,) = await onboard(procs, moto, tmp_path)
    cell, created = onboarded.cell_id, onboarded.created
    record = await show(procs, cell)
    assert record["rotation_key"], "the agent registered the key its secrets are sealed to"
    # The thief alone reads the queue now.
    assert await procs.stop(onboarded.agent) == 0
    thief = await aio_pika.connect(created["amqp_url"])
    channel = await thief.channel()
    queue = await channel.get_queue(command_queue(cell), ensure=False)

    code, rotated, err = await procs.ctl("cells", "rotate-credentials", cell)
    assert code == 0 and rotated["status"] == "pending_confirmation", err
    new_password = rotated["amqp_url"].split(":")[2].split("@")[0]
    read: list[tuple[str | None, bytes]] = []

    async def rotation_read() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            read.append((message.type, message.body))
        return any("rotate-credentials" in (kind or "") for kind, _ in read)

    await eventually(rotation_read, timeout=15, what="the rotation command in the queue")
    assert all(new_password.encode() not in body for _, body in read)
    (command,) = [json.loads(body) for kind, body in read if "rotate-credentials" in (kind or "")]
    await thief.close()
    for value in command.values():
        if isinstance(value, str):
            url = broker_urls.with_password(created["amqp_url"], value)
            with pytest.raises(ProbableAuthenticationError):
                await aio_pika.connect(url)
    fresh = await aio_pika.connect(rotated["amqp_url"])
    await fresh.close()


async def _closed(connection: aio_pika.abc.AbstractConnection) -> bool:
    """Whether the broker closed ``connection`` (it refuses a new channel on it)."""
    try:
        channel = await asyncio.wait_for(connection.channel(), 5)
    except Exception:
        return True
    await channel.close()
    return False


async def _connections_but(services: Services, cell: str, name: str) -> list[dict[str, Any]]:
    """The cell's connections, once none of them is the one named."""
    found = await cell_connections(services, cell)
    return [] if any(c["name"] == name for c in found) else found


async def _confirmed(procs: Processes, cell: str, credential_id: str) -> dict[str, Any] | None:
    return await shown_if(
        procs,
        cell,
        lambda r: r["credential_id"] == credential_id and not r["credentials_pending"],
    )


async def _heartbeat_after(procs: Processes, cell: str, first: str) -> bool:
    return bool(await shown_if(procs, cell, lambda r: r["last_heartbeat_at"] > first))


@pytest.mark.e2e
async def test_cli_refuses_bad_input_and_creates_nothing(
    procs: Processes, registry: Registry, services: Services
) -> None:
    for args, needle in (
        (["Not_A_Label", "--stage", "saas"], "id: "),
        (["svc-registry", "--stage", "saas"], "reserved prefix 'svc-'"),
        (["op-alice", "--stage", "saas"], "reserved prefix 'op-'"),
    ):
        code, out, err = await procs.ctl(
            "cells", "create", *args, "--region", "eu-west-1", "--org", "acme"
        )
        assert code == 1 and needle in err, err
        assert out == {"error": err.strip().removeprefix("error: ")}
    code, _, err = await procs.ctl(
        "cells", "create", "good-id", "--stage", "production", "--region", "eu-west-1",
        "--org", "acme",
    )  # fmt: skip
    assert code == 2 and "invalid choice: 'production'" in err
    for user in ("svc-registry", "op-alice", "good-id"):
        assert not await services.api.user_exists(user)
    code, _, err = await procs.ctl("cells", "show", "no-such-cell")
    assert code == 1 and "does not exist" in err
    code, _, err = await procs.ctl("cells", "list", "--limit", "0")
    assert code == 2 and "--limit: 0 is not between 1 and 5000" in err, err


@pytest.mark.e2e
async def test_a_restarted_registry_loses_no_cell(
    procs: Processes, registry: Registry, moto: str, tmp_path: Path
) -> None:
    cells = [c.cell_id for c in await onboard(procs, moto, tmp_path, n=3)]

    assert await procs.stop(registry.proc) == 0
    await start_registry(procs)
    for cell in cells:
        record = await eventually(partial(status_is, procs, cell, "online"), timeout=20)
        assert record["aws_account_id"] == "123456789012"
    # Page by page, by id (the session's registry holds earlier tests' cells too): each page
    # starts after the id it is given, and --all reads every page.
    code, every, _ = await procs.ctl("cells", "list", "--all")
    ids = [c["id"] for c in every]
    assert code == 0 and ids == sorted(set(ids)) and set(cells) <= set(ids)
    code, names, _ = await procs.ctl_text("cells", "list", "--all", "-o", "name")
    assert code == 0 and names.split() == ids
    code, first, _ = await procs.ctl("cells", "list", "--limit", "2")
    assert code == 0 and [c["id"] for c in first] == ids[:2]
    # The registry filters: by org, and by a selector's tests.
    org = every[ids.index(cells[0])]["org"]
    code, of_org, _ = await procs.ctl("cells", "list", "--all", "--org", org)
    assert code == 0 and [c["id"] for c in of_org] == [c["id"] for c in every if c["org"] == org]
    # (Tests of fields that never change, so earlier tests' cells cannot move meanwhile.)
    stage = every[ids.index(cells[0])]["stage"]
    code, tested, _ = await procs.ctl(
        "cells", "list", "--all", "--selector", f"org={org},stage!={stage},region=eu-west-1"
    )
    expected = [
        c["id"] for c in every
        if (c["org"], c["region"]) == (org, "eu-west-1") and c["stage"] != stage
    ]  # fmt: skip
    assert code == 0 and [c["id"] for c in tested] == expected
    code, _, err = await procs.ctl("cells", "list", "--selector", "secret=1")
    assert code == 2 and "--selector/-l: unknown field 'secret'" in err, err
    after = sorted(cells)[0]
    code, page, _ = await procs.ctl("cells", "list", "--limit", "2", "--after", after)
    assert code == 0 and [c["id"] for c in page] == [i for i in ids if i > after][:2]


@pytest.mark.e2e
@pytest.mark.parametrize("queues", ["classic", "classic-v2", "quorum"])
async def test_every_cell_queue_setting_this_broker_runs_carries_a_cell_s_commands(
    own_procs: Processes, moto: str, tmp_path: Path, queues: str
) -> None:
    """SUBSTRATE_CELL_QUEUES (docs/operating.md): each setting declares the cell's command
    queue as it says (classic declares no storage version, so RabbitMQ 4.3, which refuses
    version 1, takes it too), and a command reaches the agent through it: a rotated secret,
    which the agent confirms."""
    procs = own_procs
    await start_registry(procs, SUBSTRATE_CELL_QUEUES=queues)
    (onboarded,) = await onboard(procs, moto, tmp_path)
    cell = onboarded.cell_id
    vhost = broker_urls.vhost(procs.services.amqp_url)
    path = f"/queues/{quote(vhost, safe='')}/{quote(command_queue(cell), safe='')}"

    async def queue_stats() -> dict[str, Any] | None:
        # The storage version shows once the broker has reported the queue's statistics.
        info: dict[str, Any] = await procs.services.api.call("GET", path)
        return info if queues == "quorum" or "backing_queue_status" in info else None

    info = await eventually(queue_stats, timeout=30, interval=0.5, what="the queue's statistics")
    expected_type = "quorum" if queues == "quorum" else "classic"
    assert info["arguments"]["x-queue-type"] == expected_type
    assert info["arguments"].get("x-queue-version") == (2 if queues == "classic-v2" else None)
    if queues != "quorum":
        # What the broker runs: its default (version 1 on this machine's 3.10), or 2 as asked.
        assert info["backing_queue_status"]["version"] == (2 if queues == "classic-v2" else 1)

    code, rotated, err = await procs.ctl("cells", "rotate-credentials", cell)
    assert code == 0, err
    await eventually(
        lambda: _confirmed(procs, cell, rotated["credential_id"]), timeout=20, interval=0.3,
        what="the agent's confirmation of the secret sent through its queue",
    )  # fmt: skip
