"""Bad input from the outside (RELIABILITY.md 7): every message type a cell may send, from valid
to garbage (wrong types, huge strings, deep nesting, bad UTF-8, duplicate keys, other cells'
ids, unknown types) and the extremes (numbers past what every layer compares exactly, negative
ones, control characters, every field at and past its length, bodies at the size limit),
published with a real cell's credentials to the real services on a private broker. A message
the contract refuses lands in the `.dead` queue of every queue it reached, with a reason, and
changes nothing in Redis; one it accepts is handled, and stores no control character; and the
stream keeps flowing for the other cells (a witness cell's heartbeats go through after each
example)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.bus.consume import DEAD_REASON_HEADER
from common.messages import (
    CELLS_EXCHANGE,
    CellDebugAccess,
    CellHeartbeat,
    CellMaintenance,
    CellRegister,
    CellReport,
    CellSync,
    CellUpgrade,
)
from common.topology import SERVICE_QUEUES, dead_letter_name
from testing.cells import create_cell, new_cell_id
from testing.nodes import PrivateRabbit, PrivateRedis
from testing.polling import eventually
from testing.processes import Processes, running_processes, start_registry, start_rollout
from testing.services import Services, isolated_services

# More under make chaos (SUBSTRATE_FUZZ_EXAMPLES=2000 per message type).
EXAMPLES = int(os.environ.get("SUBSTRATE_FUZZ_EXAMPLES", "40"))
ACCOUNT = "123456789012"
NOW = datetime(2026, 11, 26, tzinfo=UTC)
MODELS: dict[str, type[CellReport]] = {
    m.kind: m
    for m in (CellRegister, CellHeartbeat, CellUpgrade, CellMaintenance, CellDebugAccess, CellSync)
}
# The budgets per cell have their own tests (test_limits.py, test_cell_security.py).
NO_BUDGETS = json.dumps({kind: [0, 1] for kind in ("register", "sync", "upgrade", "maintenance",
                                                   "debug-access")})  # fmt: skip
# Lease keys are renewed on their own; nothing a cell sends may change anything else.
_MOVING = ("lease", "leader")
QUIET_SECONDS = 0.3


def _queues(kind: str) -> list[str]:
    """The service queues a cell's report of this kind is routed to."""
    return [spec.name for specs in SERVICE_QUEUES.values() for spec in specs
            if any(b.exchange == CELLS_EXCHANGE and b.routing_key == f"*.{kind}"
                   for b in spec.bindings)]  # fmt: skip


# The fields each kind may carry besides the ones _valid fills.
OPTIONAL: dict[str, tuple[str, ...]] = {
    "register": ("stack_name", "template_version", "installed_release", "incarnation",
                 "rotation_key"),
    "heartbeat": ("installed_release", "applied_generation", "template_version",
                  "flags_snapshot_version", "credential_id", "maintenance"),
    "upgrade": ("error",),
    "maintenance": ("reason", "enabled_until"),
    "debug-access": ("reason", "granted_by", "expires_at", "occurred_at"),
    "sync": ("reason", "applied_generation", "flags_snapshot_version"),
}  # fmt: skip
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _valid(kind: str, cell: str) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {
        "register": {"agent_version": "1", "aws_account_id": ACCOUNT, "region": "eu-west-1"},
        "heartbeat": {"agent_version": "1"},
        "upgrade": {"generation": 1, "release_version": "1.0.0", "phase": "accepted"},
        "maintenance": {"enabled": True},
        "debug-access": {"action": "granted", "role_arn": "arn:aws:iam::1:role/x"},
        "sync": {},
    }
    fields = by_kind[kind]
    return {"cell_id": cell, "seq": 1, "sent_at": NOW.isoformat(), **fields}


# What probing as a cell found the contract let through, or compared differently in Python and
# Redis's Lua: numbers at and past 2**50 and 2**53, negative ones, escape sequences and other
# control characters, names at and past their length, and free text far past it.
extremes = st.sampled_from([
    2**50 - 1, 2**50, 2**53 + 1, 10**30 + 7, -1, -5, -(2**63),
    "stack\x1b[2J", "\x07\x08\x00", "a" * 64, "a" * 65, "é" * 1000, "x" * 5000, "",
])  # fmt: skip
# Every field of a report at the sizes and shapes it takes when valid, and the extremes.
max_names = st.sampled_from(["A" * 64, "a" * 128, "9" * 12, "eu-west-1", "eu-west-12"])

junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40),
              st.integers(1000, 300_000).map(lambda n: "x" * n)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=12,
)  # fmt: skip


@dataclass
class Example:
    body: bytes
    type: str | None
    cell_in_key: str  # the routing key's cell (the sender's own, or another's)


def _examples(kind: str, cell: str, other: str) -> st.SearchStrategy[Example]:
    base = _valid(kind, cell)

    def values(k: str, v: Any) -> st.SearchStrategy[Any]:
        if k == "cell_id":
            return st.one_of(st.just(v), st.just(other), junk)
        if k == "seq":
            return st.one_of(st.just(v), st.integers(-5, 2**70), extremes, junk)
        return st.one_of(st.just(v), extremes, max_names, junk)

    # The report's optional fields too, each valid, extreme or junk.
    optional = {k: st.one_of(extremes, max_names, junk) for k in OPTIONAL[kind]}
    doc = st.fixed_dictionaries({k: values(k, v) for k, v in base.items()},
                                optional={"extra": junk, **optional})  # fmt: skip
    body = st.one_of(
        doc.map(lambda d: json.dumps(d).encode()),
        # At the size limit and just past it (a valid report padded with an unknown field).
        st.sampled_from([256 * 1024 - 200, 256 * 1024 + 1]).map(
            lambda n: json.dumps({**base, "pad": "p" * n}).encode()
        ),
        doc.map(lambda d: json.dumps(d).encode()[: len(json.dumps(d)) // 2]),  # truncated
        st.binary(max_size=100).map(lambda b: b"\xff\xfe" + b),  # not UTF-8
        st.integers(10, 3000).map(lambda n: (b"[" * n) + (b"]" * n)),  # deep nesting
        st.just(json.dumps(base).replace('"seq": 1', '"seq": 1, "seq": "x"').encode()),
    )
    wire = MODELS[kind].wire_name
    # Always the sender's own routing key: the broker's topic permissions refuse another's by
    # closing the channel (tests/e2e/test_cell_security.py); here the services must refuse.
    garbage = st.builds(
        Example, body, st.sampled_from([wire, wire, wire, "cell.unknown.v9", None]), st.just(cell)
    )
    # As many that the contract accepts: the sender's own reports, any sequence number.
    fine = st.integers(0, 2**62).map(
        lambda seq: Example(json.dumps({**base, "seq": seq}).encode(), wire, cell)
    )
    return st.one_of(garbage, fine)


def _acceptable(kind: str, example: Example, cell: str) -> bool:
    """What the contract accepts: a known type, a body that validates, naming the sender."""
    if example.type != MODELS[kind].wire_name or example.cell_in_key != cell:
        return False
    try:
        msg = MODELS[kind].model_validate_json(example.body)
    except ValidationError:
        return False
    return msg.cell_id == cell and len(example.body) <= 256 * 1024


@dataclass
class Rig:
    services: Services
    procs: Processes
    cell: str
    witness: str
    connection: AbstractConnection
    channel: AbstractChannel
    guest: AbstractChannel
    redis: aioredis.Redis
    beats: int = 1
    witness_channel: AbstractChannel | None = None  # set once the witness connects
    # An accepted report's effects reach Redis after the test moves on: a registration's event
    # is handled by rollout, flags and infra_compliance, each writing its view of the cell.
    settling: bool = True  # the fixture's own registrations, at first

    async def send(self, routing_key: str, body: bytes, type_: str | None, user: str,
                   message_id: str) -> None:  # fmt: skip
        channel = self.channel if user == self.cell else self.witness_channel
        assert channel is not None
        exchange = await channel.get_exchange(CELLS_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(body, type=type_, user_id=user,
                                                message_id=message_id), routing_key)  # fmt: skip

    async def snapshot(self) -> dict[str, bytes | None]:
        keys = [
            k async for k in self.redis.scan_iter() if not any(m in k.decode() for m in _MOVING)
        ]
        return {k.decode(): await self.redis.dump(k) for k in sorted(keys)}

    async def settled(self) -> dict[str, bytes | None]:
        """Redis once an accepted report's effects stopped arriving: unchanged over a quiet
        spell (a loaded machine delays them by a few hundred milliseconds)."""
        now = await self.snapshot()
        if not self.settling:
            return now
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            await asyncio.sleep(QUIET_SECONDS)
            now, before = await self.snapshot(), now
            if now == before:
                self.settling = False
                return now
            assert asyncio.get_running_loop().time() < deadline, "Redis never settled"

    async def dead(self, queue: str, message_id: str) -> dict[str, Any] | None:
        """The dead letter of ``message_id`` in ``queue``'s dead-letter queue, taken."""
        q = await self.guest.declare_queue(dead_letter_name(queue), passive=True)
        while (m := await q.get(fail=False, no_ack=True)) is not None:
            if m.message_id == message_id:
                return dict(m.headers or {})
        return None

    async def witness_beat(self) -> None:
        """A heartbeat of another cell, then wait until the registry applied it."""
        self.beats += 1
        beat = CellHeartbeat(cell_id=self.witness, seq=self.beats, sent_at=NOW, agent_version="1")
        await self.send(f"{self.witness}.heartbeat", beat.model_dump_json().encode(),
                        CellHeartbeat.wire_name, self.witness, uuid.uuid4().hex)  # fmt: skip
        seq = self.beats

        async def applied() -> bool:
            got = await self.redis.hget(f"registry:cell:{self.witness}", "last_seq")
            return got is not None and int(got) >= seq

        await eventually(applied, timeout=30, interval=0.02, what="the witness's heartbeat")


@pytest.fixture(scope="module")
async def rig(rabbit: PrivateRabbit, redis_node: PrivateRedis,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:  # fmt: skip
    """The registry, rollout and flags on the private nodes, a cell and a witness cell created
    and registered, each with its own broker connection (its own credentials)."""
    urls = (rabbit.amqp_url, rabbit.api_url, redis_node.url)
    async with isolated_services(urls, "fuzz") as services, \
            running_processes(services, tmp_path_factory.mktemp("fuzz")) as procs:  # fmt: skip
        # The fuzz sends one cell's heartbeats far faster than its budget: every valid one must
        # be applied here (the budget has its own test, test_flood.py).
        await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="3600",
                             SUBSTRATE_HEARTBEAT_LIMIT_PER_SECOND="0",
                             SUBSTRATE_CELL_BUDGETS=NO_BUDGETS)  # fmt: skip
        await start_rollout(procs, SUBSTRATE_CELL_BUDGETS=NO_BUDGETS)
        await procs.start("flags", "substrate-flags", SUBSTRATE_CELL_BUDGETS=NO_BUDGETS)
        cell, witness = new_cell_id(), new_cell_id()
        urls_of = {c: (await create_cell(procs, c))["amqp_url"] for c in (cell, witness)}
        connection = await aio_pika.connect(urls_of[cell])
        witness_connection = await aio_pika.connect(urls_of[witness])
        guest = await aio_pika.connect(services.amqp_url)
        redis = aioredis.from_url(services.redis_url)
        r = Rig(services, procs, cell, witness, connection, await connection.channel(),
                await guest.channel(), redis)  # fmt: skip
        r.witness_channel = await witness_connection.channel()
        for c in (cell, witness):
            reg = CellRegister.model_validate(_valid("register", c))
            await r.send(f"{c}.register", reg.model_dump_json().encode(), CellRegister.wire_name,
                         c, uuid.uuid4().hex)  # fmt: skip

        async def registered() -> bool:
            return all([await redis.hget(f"registry:cell:{c}", "status") == b"online"
                        for c in (cell, witness)])  # fmt: skip

        await eventually(registered, timeout=30, interval=0.1, what="both cells registered")
        try:
            yield r
        finally:
            for conn in (connection, witness_connection, guest):
                await conn.close()
            await redis.aclose()


async def _one(rig: Rig, kind: str, example: Example) -> None:
    message_id = uuid.uuid4().hex
    acceptable = _acceptable(kind, example, rig.cell)
    event("accepted by the contract" if acceptable else "refused by the contract")
    before = None if acceptable else await rig.settled()
    await rig.send(f"{example.cell_in_key}.{kind}", example.body, example.type, rig.cell,
                   message_id)  # fmt: skip
    if not acceptable:
        # Refused by every service it reached, each saying why; Redis as it was.
        for queue in _queues(kind):
            taken = partial(rig.dead, queue, message_id)
            headers = await eventually(taken, timeout=30, interval=0.02,
                                       what=f"the dead letter in {queue}")  # fmt: skip
            assert headers.get(DEAD_REASON_HEADER), headers
        assert await rig.snapshot() == before, "a refused message changed Redis"
    rig.settling = rig.settling or acceptable
    # Either way, another cell's heartbeat still goes through.
    await rig.witness_beat()
    # Nothing a cell sent is kept with a control character in it (an operator's terminal
    # prints the record).
    record = await rig.redis.hgetall(f"registry:cell:{rig.cell}")
    kept = [v if isinstance(v, bytes) else v.encode() for v in record.values()]
    assert not [v for v in kept if CONTROL.search(v)], record
    if acceptable and "registry.cells" in _queues(kind):
        # Handled, not refused (the registry took the witness's heartbeat after it).
        assert await rig.dead("registry.cells", message_id) is None, example


def _fuzz(kind: str) -> Any:
    @pytest.mark.fault
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    async def test(rig: Rig, data: st.DataObject) -> None:
        await _one(rig, kind, data.draw(_examples(kind, rig.cell, rig.witness)))

    test.__name__ = f"test_fuzz_{kind.replace('-', '_')}_reports"
    return test


test_fuzz_register_reports = _fuzz("register")
test_fuzz_heartbeat_reports = _fuzz("heartbeat")
test_fuzz_upgrade_reports = _fuzz("upgrade")
test_fuzz_maintenance_reports = _fuzz("maintenance")
test_fuzz_debug_access_reports = _fuzz("debug-access")
test_fuzz_sync_reports = _fuzz("sync")
