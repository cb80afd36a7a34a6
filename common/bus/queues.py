"""Declaring the topology and asking the broker about queues."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from common.bus.errors import QueueMissing
from common.topology import Topology


@dataclass(frozen=True, slots=True)
class QueueState:
    messages: int
    consumers: int


class Queues:
    """Topology declarations and queue questions, each on a channel of its own: the broker
    closes a channel that asks about a missing queue."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._conn = connection
        self._inspect: AbstractRobustChannel | None = None
        self._inspect_lock = asyncio.Lock()

    async def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings. Idempotent for the same arguments."""
        channel = await self._conn.channel()
        try:
            for ex in topology.exchanges:
                await channel.declare_exchange(ex.name, ex.type, durable=True, robust=False)
            for spec in topology.queues:
                queue = await channel.declare_queue(
                    spec.name, durable=True, arguments=spec.arguments(), robust=False
                )
                for binding in spec.bindings:
                    await queue.bind(binding.exchange, binding.routing_key, robust=False)
                # The broker answers an unbind of a binding it does not have with unbind-ok.
                for binding in spec.retired:
                    await queue.unbind(binding.exchange, binding.routing_key)
        finally:
            await channel.close()

    async def delete(self, name: str) -> None:
        channel = await self._conn.channel()
        try:
            await channel.queue_delete(name)
        finally:
            await channel.close()

    async def exists(self, name: str) -> bool:
        """Whether queue ``name`` exists: one passive declaration on a channel kept for it
        (a ``state`` or a declare costs opening and closing a channel besides). Callers are
        served one at a time, as a channel carries one such request at a time."""
        async with self._inspect_lock:
            if self._inspect is None or self._inspect.is_closed:
                self._inspect = await self._conn.channel()
            try:
                await self._inspect.declare_queue(name, passive=True, robust=False)
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._inspect = None  # the broker closed the channel with its answer
                return False

    async def state(self, name: str) -> QueueState:
        """Messages ready and consumers attached, straight from the broker (not the
        management API's sampled statistics)."""
        channel = await self._conn.channel()
        try:
            queue = await channel.declare_queue(name, passive=True, robust=False)
            result = queue.declaration_result
            return QueueState(result.message_count or 0, result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise QueueMissing(f"queue {name!r} does not exist") from None
        finally:
            if not channel.is_closed:
                await channel.close()
