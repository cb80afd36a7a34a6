"""What a cell's credentials can and cannot do, against the real broker and a running
registry (RELIABILITY 14, 7 and 16), and agents across a broker restart (RELIABILITY 2)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from common.messages import CellHeartbeat, CellRegister, CellSync, command_queue
from common.topology import BROKER_MAX_MESSAGE_BYTES, POLICIES, dead_letter_name
from testing.broker import raw_publish, read_all
from testing.cells import create_cell, new_cell_id, register_as_cell, show, shown_if, status_is
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import (
    Processes,
    Registry,
    metric,
    start_flags,
    start_registry,
    start_rollout,
)
from testing.services import Services
from testing.versions import fresh_version

NOW = datetime.now(UTC)


def _body(msg: CellHeartbeat | CellRegister) -> bytes:
    return msg.model_dump_json().encode()


async def _refused(
    connection: aio_pika.abc.AbstractConnection,
    attempt: Callable[[AbstractChannel], Awaitable[Any]],
) -> str:
    """Run ``attempt`` on a fresh channel; return the broker's refusal (it must refuse)."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        await attempt(channel)
    except Exception as exc:
        return str(exc)
    finally:
        if not channel.is_closed:
            await channel.close()
    raise AssertionError("the broker allowed it")


def _hb(cell: str, seq: int) -> aio_pika.Message:
    msg = CellHeartbeat(cell_id=cell, seq=seq, sent_at=NOW, agent_version="evil",
                        installed_release="pwned")  # fmt: skip
    return aio_pika.Message(_body(msg), type=msg.wire_name)


@pytest.mark.e2e
@pytest.mark.fault
async def test_a_cell_cannot_act_as_another_cell_or_the_control_plane(
    procs: Processes, control_plane: None, services: Services
) -> None:
    # The victim sends no heartbeats and its whole record is compared before and after: a
    # liveness limit it could pass while the machine is slow would change it, so there is none.
    registry = await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="3600")
    attacker, victim = new_cell_id(), new_cell_id()
    a = await create_cell(procs, attacker)
    v = await create_cell(procs, victim)
    await register_as_cell(a["amqp_url"], attacker)
    await register_as_cell(v["amqp_url"], victim)
    await eventually(lambda: status_is(procs, victim, "online"), timeout=15, interval=0.3)
    await eventually(lambda: status_is(procs, attacker, "online"), timeout=15, interval=0.3)
    before = await show(procs, victim)

    conn = await aio_pika.connect(a["amqp_url"])
    try:

        async def publish(
            exchange: str, key: str, msg: aio_pika.Message
        ) -> Callable[[AbstractChannel], Awaitable[Any]]:
            async def run(ch: AbstractChannel) -> None:
                ex = (
                    await ch.get_exchange(exchange, ensure=False)
                    if exchange
                    else ch.default_exchange
                )
                await ex.publish(msg, key)

            return run

        def with_user(msg: aio_pika.Message, user: str) -> aio_pika.Message:
            msg.user_id = user
            return msg

        # Another cell's routing key (topic permission).
        err = await _refused(
            conn,
            await publish(
                "substrate.cells", f"{victim}.heartbeat", with_user(_hb(victim, 99), attacker)
            ),
        )
        assert "ACCESS_REFUSED" in err
        # A forged user_id.
        err = await _refused(
            conn,
            await publish(
                "substrate.cells", f"{attacker}.heartbeat", with_user(_hb(victim, 99), victim)
            ),
        )
        assert "PRECONDITION_FAILED" in err
        # Control-plane exchanges and the default exchange.
        for exchange, key in (
            ("substrate.events", "cell.online"),
            ("substrate.commands", victim),
            ("substrate.rpc", "registry"),
            ("", f"cell.{victim}.commands"),
        ):
            err = await _refused(
                conn, await publish(exchange, key, with_user(_hb(victim, 99), attacker))
            )
            assert "ACCESS_REFUSED" in err, (exchange, err)

        # Consuming another cell's queue.
        async def consume_victim(ch: AbstractChannel) -> None:
            queue = await ch.get_queue(f"cell.{victim}.commands", ensure=False)
            await queue.consume(_ignore)

        assert "ACCESS_REFUSED" in await _refused(conn, consume_victim)

        # Declaring and binding.
        async def declare_queue(ch: AbstractChannel) -> None:
            await ch.declare_queue(f"cell.{attacker}.tap", durable=True)

        async def declare_exchange(ch: AbstractChannel) -> None:
            await ch.declare_exchange(f"{attacker}.x", "fanout")

        async def bind_own_queue(ch: AbstractChannel) -> None:
            queue = await ch.get_queue(f"cell.{attacker}.commands", ensure=False)
            await queue.bind("substrate.events", "#")

        for attempt in (declare_queue, declare_exchange, bind_own_queue):
            assert "ACCESS_REFUSED" in await _refused(conn, attempt), attempt.__name__
    finally:
        await conn.close()

    # What the broker lets through, the registry refuses: no user_id, or a body for another
    # cell under the attacker's own routing key.
    await raw_publish(a["amqp_url"], "substrate.cells", f"{attacker}.heartbeat",
                      _body(CellHeartbeat(cell_id=attacker, seq=50, sent_at=NOW,
                                          agent_version="x")),
                      type="cell.heartbeat.v1")  # fmt: skip
    await raw_publish(a["amqp_url"], "substrate.cells", f"{attacker}.heartbeat",
                      _body(CellHeartbeat(cell_id=victim, seq=99, sent_at=NOW, agent_version="x")),
                      type="cell.heartbeat.v1", user_id=attacker)  # fmt: skip

    await eventually(
        lambda: registry.metric_at_least("substrate_cell_messages_refused_total", 1,
                                         reason="missing_user_id"), timeout=10)  # fmt: skip
    await eventually(
        lambda: registry.metric_at_least("substrate_cell_messages_refused_total", 1,
                                         reason="user_mismatch"), timeout=10)  # fmt: skip
    after = await show(procs, victim)
    assert after == before, "the victim's state changed"
    dead = await read_all(services.amqp_url, dead_letter_name("registry.cells"))
    reasons = [str(m.headers["x-substrate-dead-reason"]) for m in dead]
    assert any("no user_id" in r for r in reasons)
    assert any(f"user {attacker!r} sent a message for {victim!r}" in r for r in reasons)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


@pytest.mark.e2e
@pytest.mark.fault
async def test_malformed_and_oversized_cell_messages_are_dead_lettered_and_counted(
    procs: Processes, registry: Registry, services: Services
) -> None:
    cell = new_cell_id()
    created = await create_cell(procs, cell)
    url = created["amqp_url"]
    await register_as_cell(url, cell)
    await eventually(lambda: status_is(procs, cell, "online"), timeout=15, interval=0.3)
    before = await registry.metric(
        "substrate_bus_consumed_messages_total", queue="registry.cells", outcome="dead_lettered"
    )
    key = f"{cell}.heartbeat"
    bad = [
        b"{not json",
        json.dumps({"cell_id": cell, "seq": "x"}).encode(),
        b"\xff\xfe\xfd",
        b"[" * 10_000 + b"]" * 10_000,
        b'{"cell_id": "' + b"a" * 400_000 + b'"}',
    ]
    for body in bad:
        await raw_publish(url, "substrate.cells", key, body, type="cell.heartbeat.v1", user_id=cell)
    await raw_publish(url, "substrate.cells", key, b"{}", type="cell.unknown.v7", user_id=cell)
    good = CellHeartbeat(cell_id=cell, seq=10, sent_at=NOW, agent_version="1",
                         installed_release="2026.11.1")  # fmt: skip
    await raw_publish(url, "substrate.cells", key, _body(good), type=good.wire_name, user_id=cell)

    record = await eventually(
        lambda: _installed(procs, cell, "2026.11.1"), timeout=10, interval=0.2,
        what="the valid heartbeat after the bad ones",
    )  # fmt: skip
    assert record["status"] == "online"
    after = await registry.metric(
        "substrate_bus_consumed_messages_total", queue="registry.cells", outcome="dead_lettered"
    )
    assert after - before == len(bad) + 1
    dead = await read_all(services.amqp_url, dead_letter_name("registry.cells"))
    mine = [str(m.headers["x-substrate-dead-reason"]) for m in dead
            if m.headers.get("x-substrate-original-routing-key") == key]  # fmt: skip
    assert len(mine) == len(bad) + 1
    assert any("exceeds" in r for r in mine)
    assert any("unknown type 'cell.unknown.v7'" in r for r in mine)


async def _installed(procs: Processes, cell: str, release: str) -> dict[str, Any] | None:
    return await shown_if(procs, cell, lambda r: r["installed_release"] == release)


def _raw_heartbeat(cell: str, seq: int, release: str | None = None) -> aio_pika.Message:
    """A heartbeat as bytes, whatever its numbers (the contract's model would refuse them)."""
    body = {"cell_id": cell, "seq": seq, "sent_at": NOW.isoformat(), "agent_version": "1"}
    if release is not None:
        body["installed_release"] = release
    return aio_pika.Message(json.dumps(body).encode(), type="cell.heartbeat.v1", user_id=cell)


@pytest.mark.e2e
@pytest.mark.fault
async def test_numbers_no_guard_compares_exactly_are_refused_and_hold_up_no_one(
    procs: Processes, registry: Registry
) -> None:
    """A cell flooding heartbeats with a ``seq`` no double holds exactly (10**30 + i) stalled
    the registry's queue for every cell: Python and the Lua guard compared it differently, each
    delivery was held through its retry pauses, and the batched acks could not pass it. Such a
    number is refused at validation, at once: another cell's heartbeat published after the
    flood is applied within seconds, and the flooding cell's next genuine one still counts."""
    attacker, victim = new_cell_id(), new_cell_id()
    urls = {cell: (await create_cell(procs, cell))["amqp_url"] for cell in (attacker, victim)}
    for cell, url in urls.items():
        await register_as_cell(url, cell)
        online = partial(status_is, procs, cell, "online")
        await eventually(online, timeout=15, interval=0.3, what=f"{cell} online")
    dead_lettered = {"queue": "registry.cells", "outcome": "dead_lettered"}
    before = await registry.metric("substrate_bus_consumed_messages_total", **dead_lettered)

    flood = 1500
    connection = await aio_pika.connect(urls[attacker])
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("substrate.cells", ensure=False)
        key = f"{attacker}.heartbeat"
        await asyncio.gather(
            *(exchange.publish(_raw_heartbeat(attacker, 10**30 + i), key) for i in range(flood))
        )
    finally:
        await connection.close()

    for cell, release in ((victim, "after-the-flood"), (attacker, "genuine")):
        await raw_publish(
            urls[cell], "substrate.cells", f"{cell}.heartbeat",
            _raw_heartbeat(cell, 5, release).body, type="cell.heartbeat.v1", user_id=cell,
        )  # fmt: skip
        record = await eventually(
            partial(_installed, procs, cell, release),
            timeout=8, interval=0.2, what=f"{cell}'s heartbeat after the flood applied",
        )  # fmt: skip
        assert record["status"] == "online"
    after = await registry.metric("substrate_bus_consumed_messages_total", **dead_lettered)
    assert after - before == flood


@pytest.mark.e2e
@pytest.mark.fault
async def test_an_escape_code_a_cell_sends_never_reaches_an_operators_terminal(
    procs: Processes, registry: Registry, services: Services
) -> None:
    """A registration whose stack name carried an escape sequence was stored and printed raw by
    `cells show`, clearing the operator's screen. Names are refused unless they are names (the
    free text a cell may send, an upgrade's error or a debug reason, is stored with its control
    characters as visible escapes), and the CLI prints any control character as an escape."""
    cell = new_cell_id()
    url = (await create_cell(procs, cell))["amqp_url"]
    register = {
        "cell_id": cell, "sent_at": NOW.isoformat(), "agent_version": "1", "incarnation": "i",
        "aws_account_id": "123456789012", "region": "eu-west-1",
    }  # fmt: skip
    for seq, stack in ((1, "stack"), (2, "stack\x1b[2J")):
        body = json.dumps({**register, "seq": seq, "stack_name": stack}).encode()
        await raw_publish(url, "substrate.cells", f"{cell}.register", body,
                          type=CellRegister.wire_name, user_id=cell)  # fmt: skip

    found: list[str] = []

    async def settled() -> bool:
        """The second registration refused (its dead letter read) or stored."""
        dead = await read_all(services.amqp_url, dead_letter_name("registry.cells"))
        key = f"{cell}.register"
        found.extend(
            str(m.headers["x-substrate-dead-reason"])
            for m in dead
            if m.headers.get("x-substrate-original-routing-key") == key
        )
        return bool(found) or bool(
            await shown_if(procs, cell, lambda r: r["stack_name"] != "stack")
        )

    await eventually(settled, timeout=15, what="the second registration handled")
    code, shown, err = await procs.ctl_text("cells", "show", cell)
    assert code == 0, err
    assert "\x1b" not in shown
    assert len(found) == 1 and "stack_name" in found[0], found


async def _queues(services: Services) -> dict[str, dict[str, Any]]:
    found = await services.api.call("GET", f"/queues/{quote(services.vhost, safe='')}")
    return {q["name"]: q for q in found}


@pytest.mark.e2e
@pytest.mark.fault
async def test_oversized_and_flooded_messages_leave_broker_storage_bounded(
    procs: Processes, registry: Registry, services: Services, tmp_path: Path
) -> None:
    """One cell could fill the broker's storage: it took bodies up to 128 MiB, each service
    dead-lettered a copy of an oversized one, no queue had a length or byte bound, and each
    sync the cell sent put a command in its own queue (1,500 syncs, 1,500 commands). Now the
    broker refuses a body past its cap, a refused body is dead-lettered as its first bytes,
    every queue the control plane declares is bounded in bytes, and syncs past the cell's
    budget are counted and answered by nothing."""
    flags_port = free_port()
    await start_flags(procs, SUBSTRATE_METRICS_PORT=str(flags_port))
    # A cell without a snapshot is sent one for each sync it sends.
    flag = tmp_path / "flag.yaml"
    flag.write_text("key: storage-flag\nowner: team\nrules:\n  - serve: on\n")
    code, _, err = await procs.ctl("flags", "set", str(flag))
    assert code == 0, err
    cell = new_cell_id()
    url = (await create_cell(procs, cell))["amqp_url"]
    await register_as_cell(url, cell)
    await eventually(lambda: status_is(procs, cell, "online"), timeout=15, interval=0.3)

    # Every queue the control plane declared (the cell's too) is under a byte bound (as the
    # management API shows it: its view of a new queue lags by a statistics interval, longer on
    # a busy machine). Queues other tests of the session declared to watch the bus ("test.*")
    # are theirs, and a client's server-named reply queue ("amq.gen-*") lives only as long as
    # its connection: neither is the control plane's storage.
    unbounded: list[str] = []

    async def bounded() -> dict[str, dict[str, Any]] | None:
        queues = {n: q for n, q in (await _queues(services)).items()
                  if not n.startswith(("test.", "amq."))}  # fmt: skip
        bounds = {name: q.get("effective_policy_definition") or {} for name, q in queues.items()}
        if command_queue(cell) not in queues or "registry.cells.dead" not in queues:
            return None
        unbounded[:] = sorted(n for n, b in bounds.items() if not b.get("max-length-bytes"))
        return None if unbounded else queues

    try:
        queues = await eventually(bounded, timeout=60, what="every queue under a byte bound")
    except AssertionError as failed:
        raise AssertionError(f"{failed}; unbounded: {unbounded}") from None
    assert {q["policy"] for q in queues.values()} <= {p.name for p in POLICIES}

    # Past the broker's cap, a body is refused by the broker itself.
    connection = await aio_pika.connect(url)
    try:
        huge = aio_pika.Message(b"x" * (BROKER_MAX_MESSAGE_BYTES + 1), user_id=cell)
        err = await _refused(
            connection,
            lambda ch: _publish(ch, "substrate.cells", f"{cell}.heartbeat", huge),
        )
        assert "PRECONDITION_FAILED" in err and "max size" in err, err

        # Under the cap but past what a service takes: dead-lettered as its first bytes.
        dead_before = (await _queues(services))["registry.cells.dead"]["message_bytes"]
        channel = await connection.channel(publisher_confirms=True)
        cells_exchange = await channel.get_exchange("substrate.cells", ensure=False)
        big = b'{"cell_id": "' + b"a" * (2 * 1024 * 1024) + b'"}'
        for _ in range(10):
            await cells_exchange.publish(
                aio_pika.Message(big, type=CellHeartbeat.wire_name, user_id=cell),
                f"{cell}.heartbeat",
            )

        async def dead_lettered() -> int | None:
            dead = (await _queues(services))["registry.cells.dead"]
            return dead["message_bytes"] if dead["messages"] >= 10 else None

        dead_after = await eventually(dead_lettered, timeout=20, what="10 dead letters")
        assert dead_after - dead_before < 10 * 16 * 1024, "a dead letter copied the whole body"

        # A sync flood: the cell's budget answers about its burst, not 1,500 of them.
        sync = {"cell_id": cell, "sent_at": NOW.isoformat(), "reason": "periodic"}
        flood = 1500
        await asyncio.gather(*(
            cells_exchange.publish(
                aio_pika.Message(json.dumps({**sync, "seq": 10 + i}).encode(),
                                 type=CellSync.wire_name, user_id=cell),
                f"{cell}.sync",
            )
            for i in range(flood)
        ))  # fmt: skip
    finally:
        await connection.close()

    async def limited() -> bool:
        counted = await metric(flags_port, "substrate_cell_messages_limited_total", kind="sync")
        # A budget of 20 at once and one a second: however slowly the machine takes the flood
        # in, most of it is over budget.
        return counted >= flood // 2

    await eventually(limited, timeout=30, what="flags to have counted the syncs past the budget")
    commands = (await _queues(services))[command_queue(cell)]["messages"]
    assert commands <= flood // 5, f"{commands} commands queued for one cell's sync flood"


async def _publish(
    channel: AbstractChannel, exchange: str, key: str, message: aio_pika.Message
) -> None:
    ex = await channel.get_exchange(exchange, ensure=False)
    await ex.publish(message, key)


@pytest.mark.e2e
async def test_a_storage_policy_deleted_or_never_applied_is_put_back(own_procs: Processes) -> None:
    """The registry applied the policies that bound queue storage once, at start: a management
    API that failed that once, or an operator deleting one, left the queues unbounded until the
    next restart. It puts them again every SUBSTRATE_POLICY_INTERVAL_SECONDS."""
    services = own_procs.services
    policies = f"/policies/{quote(services.vhost, safe='')}"

    async def applied() -> set[str]:
        return {p["name"] for p in await services.api.call("GET", policies)}

    assert not await applied(), "the vhost starts without the policies"
    await start_registry(own_procs, SUBSTRATE_POLICY_INTERVAL_SECONDS="0.5")
    every_policy = {p.name for p in POLICIES}
    await eventually(lambda: _has(applied, every_policy), timeout=20, what="the policies applied")
    await services.api.call("DELETE", f"{policies}/cell-commands")
    await eventually(lambda: _has(applied, every_policy), timeout=20, what="the policy put back")


async def _has(found: Callable[[], Awaitable[set[str]]], expected: set[str]) -> bool:
    return await found() >= expected


@pytest.mark.e2e
@pytest.mark.fault
async def test_an_outcome_for_what_was_never_sent_changes_no_view(
    procs: Processes, control_plane: None, services: Services, tmp_path: Path
) -> None:
    """A canary reporting success for a release it was never offered (and a generation never
    sent) was written into rollout's view of it, and the rollout went on as if the canary
    had taken the release. Rollout takes an outcome only for what it sent that cell: the rest
    is refused, dead-lettered with the reason and counted, and no view moves."""
    # The cells send no heartbeats: they must not go offline while the test looks.
    await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="3600")
    await start_rollout(procs)
    policy = tmp_path / "policy.yaml"
    policy.write_text("soak_seconds: {staging: 3600, saas: 3600, dedicated: 3600}\n")
    code, _, err = await procs.ctl("rollout", "policy", "set", str(policy))
    assert code == 0, err
    # A staging cell that never reports keeps the release in staging.
    cell, staging = new_cell_id(), new_cell_id()
    url = (await create_cell(procs, cell, stage="dedicated"))["amqp_url"]
    await register_as_cell(url, cell)
    await register_as_cell(
        (await create_cell(procs, staging, stage="staging"))["amqp_url"], staging
    )
    for each in (cell, staging):
        online = partial(status_is, procs, each, "online")
        await eventually(online, timeout=15, interval=0.3, what=f"{each} online")
    version = fresh_version()
    release = tmp_path / "release.yaml"
    release.write_text(
        f"version: {version}\ncomponents:\n  - name: server\n"
        f"    image: example.com/substrate/server\n    digest: sha256:{'a' * 64}\n"
    )
    code, _, err = await procs.ctl("release", "publish", str(release))
    assert code == 0, err
    code, before, err = await procs.ctl("rollout", "explain", cell)
    assert code == 0, err

    forged = {"cell_id": cell, "sent_at": NOW.isoformat(), "phase": "succeeded"}
    for seq, generation, release_version in ((5, 1, version), (6, 99, "2099.1.1")):
        body = {**forged, "seq": seq, "generation": generation, "release_version": release_version}
        await raw_publish(url, "substrate.cells", f"{cell}.upgrade", json.dumps(body).encode(),
                          type="cell.upgrade.v1", user_id=cell)  # fmt: skip

    async def both_refused() -> list[str] | None:
        dead = await read_all(services.amqp_url, dead_letter_name("rollout.cells"))
        key = f"{cell}.upgrade"
        reasons = [str(m.headers["x-substrate-dead-reason"]) for m in dead
                   if m.headers.get("x-substrate-original-routing-key") == key]  # fmt: skip
        return reasons if len(reasons) == 2 else None

    reasons = await eventually(both_refused, timeout=15, what="both forged outcomes refused")
    # (The session's Redis is shared: where an earlier test's release reached dedicated, the
    # new cell was sent it as its first install, and generation 1 names what that carried.)
    never_sent = re.compile(r"was never sent to the cell|generation 1 carried release '[^']+', "
                            rf"not '{re.escape(version)}'")  # fmt: skip
    assert all(never_sent.search(r) for r in reasons), reasons
    code, after, err = await procs.ctl("rollout", "explain", cell)
    assert code == 0, err
    assert after == before
    code, status, err = await procs.ctl("rollout", "status", version)
    assert code == 0, err
    assert status["stages"]["dedicated"]["updated"] == 0, status
