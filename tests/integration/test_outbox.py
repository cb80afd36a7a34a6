"""The outbox against real Redis and the broker: an event written with its state is
published, one left in flight by a crashed relay is published again, and one that no queue
wants does not block the rest."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from common.bus import RabbitBus
from common.messages import EVENTS_EXCHANGE, CellOnline, Delivery, RolloutCompleted
from common.outbox import Outbox, outbox_entry
from common.routes import route
from common.topology import Binding, Topology, consuming_queue
from tests.conftest import Services
from tests.helpers import eventually

NOW = datetime.now(UTC)


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_events_are_published_after_a_crash_and_unroutable_ones_do_not_block(
    bus: RabbitBus, redis: aioredis.Redis
) -> None:
    key = f"test:outbox:{uuid.uuid4().hex[:6]}"
    outbox = Outbox(redis, key)
    queue = f"test.outbox.{uuid.uuid4().hex[:6]}"
    await bus.declare(Topology((), consuming_queue(queue, Binding(EVENTS_EXCHANGE, "cell.online"))))
    received: list[tuple[str, str | None]] = []
    got_all = asyncio.Event()

    async def on_online(msg: CellOnline, delivery: Delivery) -> None:
        received.append((msg.cell_id, delivery.message_id))
        if len(received) == 2:
            got_all.set()

    await bus.consume(queue, [route(CellOnline, on_online)])

    # A previous relay took this entry and died before publishing it.
    crashed = outbox_entry(CellOnline(at=NOW, cell_id="cell-one"))
    await redis.rpush(outbox.inflight_key, crashed)
    # No queue in the control-plane topology binds rollout.completed (yet): unroutable.
    await redis.rpush(key, json.dumps({
        "id": "nobody", "type": RolloutCompleted.wire_name,
        "body": RolloutCompleted(at=NOW, version="x").model_dump_json(),
    }))  # fmt: skip
    await outbox.put(CellOnline(at=NOW, cell_id="cell-two"))

    stop = asyncio.Event()
    relay = asyncio.create_task(outbox.relay(bus, stop))
    try:
        await asyncio.wait_for(got_all.wait(), 10)
        await eventually(lambda: _empty(outbox), what="outbox drained")
    finally:
        stop.set()
        await relay
    assert [cell for cell, _ in received] == ["cell-one", "cell-two"]
    assert received[0][1] == json.loads(crashed)["id"], "published under its outbox id"


async def _empty(outbox: Outbox) -> bool:
    return await outbox.pending() == 0
