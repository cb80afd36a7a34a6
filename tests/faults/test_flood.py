"""A flood from one cell (RELIABILITY.md 16): the registry spends a per-cell heartbeat budget
before any Redis work, so the flooder's excess costs a parse and an ack, and the other cells'
heartbeats, in the same queue, are applied. How long they wait is measured in bench/flood.py."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aio_pika
import pytest

from common.messages import CELLS_EXCHANGE, CellHeartbeat
from services.registry.settings import RegistrySettings
from testing.cells import create_cell, new_cell_id, register_as_cell, show, shown_if, status_is
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services


@pytest.fixture
async def private(machine: Services) -> Services:
    """This module faults processes only: the machine's broker and Redis serve it."""
    return machine


FLOOD = 3_000
LIMIT = RegistrySettings.model_fields["heartbeat_limit_per_second"].default
BURST = RegistrySettings.model_fields["heartbeat_burst"].default


def _beat(cell: str, seq: int, version: str) -> aio_pika.Message:
    msg = CellHeartbeat(cell_id=cell, seq=seq, sent_at=datetime.now(UTC), agent_version=version)
    return aio_pika.Message(msg.model_dump_json().encode(), type=msg.wire_name, user_id=cell)


@pytest.mark.fault
async def test_a_flood_from_one_cell(fprocs: Processes) -> None:
    registry = await start_registry(fprocs, SUBSTRATE_OFFLINE_AFTER_SECONDS="3600")
    ids = [new_cell_id() for _ in range(4)]
    urls = {}
    for cell in ids:
        urls[cell] = (await create_cell(fprocs, cell))["amqp_url"]
        await register_as_cell(urls[cell], cell)
    for cell in ids:
        await eventually(partial(status_is, fprocs, cell, "online"), timeout=30, interval=0.3)
    flooder, others = ids[0], ids[1:]

    # The flooder publishes as fast as its connection takes it, without waiting for confirms.
    started = time.monotonic()
    connection = await aio_pika.connect(urls[flooder])
    try:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(CELLS_EXCHANGE, ensure=False)
        for seq in range(10, 10 + FLOOD):
            await exchange.publish(_beat(flooder, seq, f"flood-{seq}"), f"{flooder}.heartbeat")
        # Then each other cell beats once, behind the flood in the registry's queue.
        for cell in others:
            async with await aio_pika.connect(urls[cell]) as own:
                ch = await own.channel()
                ex = await ch.get_exchange(CELLS_EXCHANGE, ensure=False)
                await ex.publish(_beat(cell, 10, "after-the-flood"), f"{cell}.heartbeat")
        await channel.close()
    finally:
        await connection.close()

    async def others_applied() -> bool:
        def applied(record: dict[str, Any]) -> bool:
            return bool(record["agent_version"] == "after-the-flood")

        return all([await shown_if(fprocs, c, applied) for c in others])

    await eventually(others_applied, timeout=60, interval=0.3, what="the others' heartbeats")
    elapsed = time.monotonic() - started

    async def all_counted() -> bool:
        limited = await registry.metric("substrate_heartbeats_total", outcome="limited")
        applied = await registry.metric("substrate_heartbeats_total", outcome="applied")
        return limited + applied >= FLOOD + len(others)

    await eventually(all_counted, timeout=60, interval=0.3, what="every heartbeat consumed")
    limited = await registry.metric("substrate_heartbeats_total", outcome="limited")
    # At most the burst and the rate over the time it took went through; the rest were dropped
    # without a Redis round trip.
    assert limited >= FLOOD - BURST - LIMIT * (time.monotonic() - started + 1), (limited, elapsed)
    assert (await show(fprocs, flooder))["status"] == "online"
