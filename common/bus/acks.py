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

    The ack names the highest delivery acked here, never one nacked or rejected on its own:
    the broker no longer holds those, and an ack naming a delivery tag it does not hold closes
    the channel (``unknown delivery tag``), handing back every delivery still being handled.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # Settled tags above the contiguous run: True if acked, False if settled otherwise.
        self._settled: dict[int, bool] = {}
        self._contiguous = 0  # every tag up to this one is settled
        self._ackable = 0  # the highest acked tag of that run
        self._sent = 0  # acked up to this tag
        self._flush: asyncio.Task[None] | None = None

    def ack(self, tag: int) -> None:
        self._settle(tag, acked=True)

    def settled_otherwise(self, tag: int) -> None:
        """A tag nacked or rejected on its own: it no longer blocks the acks after it."""
        self._settle(tag, acked=False)

    def _settle(self, tag: int, *, acked: bool) -> None:
        self._settled[tag] = acked
        while (was_acked := self._settled.pop(self._contiguous + 1, None)) is not None:
            self._contiguous += 1
            if was_acked:
                self._ackable = self._contiguous
        if self._ackable > self._sent and self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        await asyncio.sleep(0)  # let the handlers finishing in this turn settle first
        try:
            while self._ackable > self._sent:
                upto = self._ackable
                if not self.channel.is_closed:
                    await self.channel.basic_ack(upto, multiple=True)
                self._sent = upto
        finally:
            self._flush = None

    async def drain(self) -> None:
        if self._flush is not None:
            await asyncio.shield(self._flush)
