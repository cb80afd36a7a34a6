"""The raw aio-pika baseline that every consume benchmark measures beside its own figure."""

from __future__ import annotations

import asyncio
import time

import aio_pika
from aio_pika.abc import AbstractIncomingMessage


async def raw_drain(amqp_url: str, queue: str, n: int, prefetch: int) -> float:
    """Consume and ack ``n`` messages from ``queue`` with plain aio-pika; messages per second."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.declare_queue(queue, passive=True)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen == n:
                done.set()

        started = time.perf_counter()
        tag = await q.consume(on_message)
        await done.wait()
        rate = n / (time.perf_counter() - started)
        await q.cancel(tag)
        return rate
    finally:
        await connection.close()
