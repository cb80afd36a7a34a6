"""The broker as a test reaches it around the bus: raw publishing (for bodies the bus would
never produce), reading a queue's messages, and a queue that copies one cell's reports."""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE
from common.topology import Binding, Topology, consuming_queue


async def cell_queue(bus: RabbitBus, cell_id: str, *kinds: str) -> str:
    """A consuming queue (with its .dead queue) bound to one cell's reports."""
    name = f"test.{cell_id}"
    bindings = [Binding(CELLS_EXCHANGE, f"{cell_id}.{kind}") for kind in kinds or ("heartbeat",)]
    await bus.declare(Topology((), consuming_queue(name, *bindings)))
    return name


async def raw_publish(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    type: str | None = None,
    user_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish exactly these bytes, with confirms, bypassing the bus and its validation."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ex = await channel.get_exchange(exchange, ensure=False)
        await ex.publish(
            aio_pika.Message(
                body, type=type, user_id=user_id, headers=headers, content_type="application/json"
            ),
            routing_key,
            mandatory=True,
        )
    finally:
        await connection.close()


async def read_all(url: str, queue: str) -> list[AbstractIncomingMessage]:
    """Take every ready message from ``queue`` (acked: the queue is drained)."""
    connection = await aio_pika.connect(url)
    found: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            found.append(message)
    finally:
        await connection.close()
    return found
