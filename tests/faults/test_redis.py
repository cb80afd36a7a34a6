"""Faults of Redis (RELIABILITY.md 10), on a private redis-server with AOF and `appendfsync
always`, the setting compose runs: kill -9 right after an operator was told "done"."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from common import redis_client
from common.bus.rabbit_bus import RabbitBus
from common.messages import CellRegister
from common.topology import DELIVERY_LIMIT, dead_letter_name
from testing.cells import create_cell, heartbeat, new_cell_id, show
from testing.fleet import Fleet
from testing.ledger import CELLS, Ledger, applier_env
from testing.nodes import PrivateRedis
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services


async def _answers(fleet: Fleet, *args: str) -> bool:
    code, _, _ = await fleet.procs.ctl(*args)
    return code == 0


@pytest.mark.fault
async def test_redis_killed_right_after_acknowledgement(
    fleet: Fleet, redis_node: PrivateRedis, tmp_path: Path
) -> None:
    """10. Each write acknowledged to an operator (a cell's creation, a flag, a policy, a
    release) survives kill -9 of Redis the moment the acknowledgement arrives, and the first
    request after each crash is answered (the services' pooled connections to the old Redis are
    dead; the client retries on a new one). The services carry on without a restart, the fleet
    view recovers from heartbeats, and the release reaches every cell once (SUBSTRATE_FAULT_CELLS
    cells; Redis is killed once more mid-rollout)."""
    procs = fleet.procs
    await procs.start("flags", "substrate-flags")
    cells = await fleet.add("staging", 1, **applier_env())
    cells += await fleet.add("dedicated", max(CELLS - 1, 2), **applier_env())

    async def crash() -> None:
        await redis_node.kill()
        await redis_node.start()

    made = new_cell_id()
    await create_cell(procs, made, stage="dedicated")
    await crash()
    assert (await show(procs, made))["status"] == "created"

    flag = tmp_path / "flag.yaml"
    flag.write_text("key: fault-flag\nowner: team\nrules:\n  - serve: on\n")
    code, _, err = await procs.ctl("flags", "set", str(flag))
    assert code == 0, err
    policy = tmp_path / "quick.yaml"
    policy.write_text("soak_seconds: {staging: 0, saas: 0, dedicated: 0}\n")
    code, _, err = await procs.ctl("rollout", "policy", "set", str(policy))
    assert code == 0, err
    await crash()
    assert await _answers(fleet, "flags", "show", "fault-flag")
    code, shown, _ = await procs.ctl("rollout", "policy", "show")
    assert shown["soak_seconds"]["dedicated"] == 0, shown

    version = await fleet.publish(1)
    await crash()
    assert await _answers(fleet, "release", "show", version)
    # And again mid-rollout: staging done, dedicated to come.
    await fleet.wait_installed(cells[:1], version, timeout=120)
    await crash()

    await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    ledger = Ledger()
    for cell in cells:
        ledger.confirm(cell.id, version, ["server"])
        ledger.read(cell.id, cell.state)
    ledger.check()

    # The fleet view came back from heartbeats: every running cell online.
    for cell in cells:
        assert (await show(procs, cell.id))["status"] == "online"
    assert all(p.process.returncode is None for p in procs.running)


def _unread_requests(port: int) -> int:
    """Connections to a Redis on ``port`` holding bytes it has not read (it is paused)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(1 for line in out.splitlines() if int(line.split()[0]) > 0)


@pytest.mark.fault
async def test_the_first_command_after_a_redis_restart_succeeds(redis_node: PrivateRedis) -> None:
    """A command in flight when Redis is killed loses its connection. A client that does not
    retry (set so here, whatever redis-py's defaults are) fails it; the services' client retries
    it on a new connection to the restarted Redis, and AOF kept the value."""
    plain = aioredis.from_url(
        redis_node.url, decode_responses=True, retry=Retry(NoBackoff(), 0), retry_on_error=[]
    )
    ours = redis_client.connect(redis_node.url)
    try:
        await ours.set("restart:1", "1")
        assert await plain.get("restart:1") == "1"
        redis_node.pause()
        in_flight = [asyncio.ensure_future(c.get("restart:1")) for c in (plain, ours)]
        # Both requests are on their sockets, unread by the paused Redis, before it dies.
        await eventually(lambda: _unread_requests(redis_node.port) == 2, what="both sent")
        await redis_node.kill()
        await redis_node.start()
        failed, answered = await asyncio.gather(*in_flight, return_exceptions=True)
        assert isinstance(failed, RedisConnectionError), failed
        assert answered == "1", answered
    finally:
        await plain.aclose()
        await ours.aclose()


@pytest.mark.fault
async def test_a_burst_beyond_the_pool_waits_for_connections_instead_of_failing(
    redis_node: PrivateRedis,
) -> None:
    """Each command in flight holds a connection. redis-py's own pool fails the 101st at once
    (MaxConnectionsError: a registration storm's deliveries in flight met it); the services'
    pool makes a burst wait for a connection, and opens no more than its bound."""
    ours = redis_client.connect(redis_node.url)
    watcher = aioredis.from_url(redis_node.url, decode_responses=True)
    burst = 5 * redis_client.POOL_CONNECTIONS
    assert burst > 100  # beyond redis-py's own default
    try:
        await ours.set("burst", "1")
        answers = await asyncio.gather(*(ours.get("burst") for _ in range(burst)))
        assert answers == ["1"] * burst
        clients = (await watcher.info("clients"))["connected_clients"]
        assert clients <= redis_client.POOL_CONNECTIONS + 1  # ours, and the watcher
    finally:
        await ours.aclose()
        await watcher.aclose()


@pytest.mark.fault
async def test_a_report_waits_out_redis_refusing_writes_instead_of_being_dead_lettered(
    fprocs: Processes, private: Services, fbus: RabbitBus
) -> None:
    """Redis refusing writes for a while (full: maxmemory reached) fails a handler at once,
    not after the client's retries. A report is then held a growing pause between tries and
    applied once Redis takes writes again; before the pause, its five tries took milliseconds
    and it was dead-lettered."""
    registry = await start_registry(fprocs, SUBSTRATE_OFFLINE_AFTER_SECONDS="3600")
    cell = new_cell_id()
    url = (await create_cell(fprocs, cell))["amqp_url"]
    redis = aioredis.from_url(private.redis_url, decode_responses=True)
    bus = await RabbitBus.connect(url, name=f"cell:{cell}", namespace="cell_agent")
    retried = {"queue": "registry.cells", "outcome": "retried"}

    async def seq_applied(seq: int) -> bool:
        return await redis.hget(f"registry:cell:{cell}", "last_seq") == str(seq)

    try:
        await bus.publish(CellRegister(cell_id=cell, seq=1, sent_at=datetime.now(UTC),
                                       agent_version="t", aws_account_id="123456789012",
                                       region="eu-west-1", incarnation="t"))  # fmt: skip
        await eventually(lambda: seq_applied(1), timeout=30, what="the registration applied")
        await redis.config_set("maxmemory", 1)
        try:
            await bus.publish(heartbeat(cell, seq=2))
            await eventually(
                lambda: registry.metric_at_least("substrate_bus_consumed_messages_total", 2,
                                                 **retried),
                timeout=30, what="two failed tries",
            )  # fmt: skip
        finally:
            await redis.config_set("maxmemory", 0)
        await eventually(lambda: seq_applied(2), timeout=30, what="the heartbeat applied")
        assert await registry.metric("substrate_bus_consumed_messages_total", **retried) < (
            DELIVERY_LIMIT
        )
        assert (await fbus.queue_state(dead_letter_name("registry.cells"))).messages == 0
    finally:
        await bus.close(drain_timeout=1)
        await redis.aclose()
