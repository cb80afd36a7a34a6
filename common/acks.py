"""Batched acknowledgements for a consumer whose handlers run concurrently."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol


class Channel(Protocol):
    """The part of an AMQP channel this needs (aiormq's channel has it)."""

    @property
    def is_closed(self) -> bool: ...

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> Awaitable[object]: ...


class BatchedAcks:
    """Acknowledges finished deliveries of one channel with a single ``multiple`` ack per turn
    of the event loop, but only up to the highest delivery tag below which every delivery is
    settled: handlers run concurrently and finish out of order, and an ack must never cover a
    message whose handler is still running. Saves a frame (and broker work) per message.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._settled: set[int] = set()
        self._contiguous = 0  # every tag up to this one is settled
        self._sent = 0  # acked up to this tag
        self._flush: asyncio.Task[None] | None = None

    def ack(self, tag: int) -> None:
        self._settle(tag)
        if self._contiguous > self._sent and self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    def settled_otherwise(self, tag: int) -> None:
        """A tag nacked on its own: it no longer blocks the acks after it."""
        self._settle(tag)

    def _settle(self, tag: int) -> None:
        self._settled.add(tag)
        while self._contiguous + 1 in self._settled:
            self._contiguous += 1
            self._settled.discard(self._contiguous)

    async def _send(self) -> None:
        await asyncio.sleep(0)  # let the handlers finishing in this turn settle first
        try:
            while self._contiguous > self._sent:
                upto = self._contiguous
                if not self.channel.is_closed:
                    await self.channel.basic_ack(upto, multiple=True)
                self._sent = upto
        finally:
            self._flush = None

    async def drain(self) -> None:
        if self._flush is not None:
            await asyncio.shield(self._flush)
