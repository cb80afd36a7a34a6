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

from common.bus.errors import NotConnected
from common.bus.rabbit_bus import RabbitBus
from common.messages import EVENTS_EXCHANGE, CellOffline, CellOnline, Delivery, RolloutCompleted
from common.outbox import Outbox, outbox_entry
from common.routes import route
from common.topology import Binding, Topology, consuming_queue
from testing.polling import eventually
from testing.services import Services

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


async def test_a_batch_keeps_each_destinations_order(bus: RabbitBus, redis: aioredis.Redis) -> None:
    """Entries go out a batch at a time; those for one routing key arrive in the order they
    were written, whatever the batch size."""
    key = f"test:outbox:{uuid.uuid4().hex[:6]}"
    outbox = Outbox(redis, key)
    received: dict[str, list[str]] = {"cell.online": [], "cell.offline": []}
    done = asyncio.Event()
    total = 250

    async def on_event(msg: CellOnline | CellOffline, delivery: Delivery) -> None:
        received[delivery.routing_key].append(msg.cell_id)
        if sum(map(len, received.values())) == total:
            done.set()

    for event_key in received:
        queue = f"test.outbox.{event_key}.{uuid.uuid4().hex[:6]}"
        await bus.declare(Topology((), consuming_queue(queue, Binding(EVENTS_EXCHANGE, event_key))))
        await bus.consume(queue, [route(CellOnline, on_event), route(CellOffline, on_event)])
    written: dict[str, list[str]] = {"cell.online": [], "cell.offline": []}
    for i in range(total):
        event = CellOnline if i % 3 else CellOffline
        await outbox.put(event(at=NOW, cell_id=f"cell-{i:03d}"))
        written[event.event_key].append(f"cell-{i:03d}")

    assert await outbox.publish_batch(bus, limit=100) == 100
    stop = asyncio.Event()
    relay = asyncio.create_task(outbox.relay(bus, stop))
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        stop.set()
        await relay
    assert received == written
    assert await outbox.pending() == 0


class FailingBus:
    """Publishes everything but the messages of one cell (a pure test of the failure path)."""

    def __init__(self, failing_cell: str) -> None:
        self.failing_cell = failing_cell
        self.published: list[str] = []

    async def publish(self, message: CellOnline | CellOffline, message_id: str) -> None:
        if message.cell_id == self.failing_cell:
            raise NotConnected("the broker went away")
        self.published.append(message.cell_id)


async def test_a_failed_publish_goes_back_to_the_head_with_what_follows_it(
    redis: aioredis.Redis,
) -> None:
    """In a batch, the entry whose publish failed and the later entries for the same routing
    key go back to the head of the list, in order; the rest of the batch is published."""
    outbox = Outbox(redis, f"test:outbox:{uuid.uuid4().hex[:6]}")
    order = [(CellOnline, "cell-a"), (CellOffline, "cell-b"), (CellOnline, "cell-bad"),
             (CellOffline, "cell-c"), (CellOnline, "cell-d"), (CellOnline, "cell-e")]  # fmt: skip
    for event, cell in order:
        await outbox.put(event(at=NOW, cell_id=cell))
    failing = FailingBus("cell-bad")
    with pytest.raises(NotConnected):
        await outbox.publish_batch(failing, limit=10)  # type: ignore[arg-type]
    assert sorted(failing.published) == ["cell-a", "cell-b", "cell-c"]
    left = [
        json.loads(json.loads(raw)["body"])["cell_id"]
        for raw in await redis.lrange(outbox.key, 0, -1)
    ]
    assert left == ["cell-bad", "cell-d", "cell-e"]
    assert await redis.llen(outbox.inflight_key) == 0
