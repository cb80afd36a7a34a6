"""The bus's batched acks: one multiple ack per turn, never past an unsettled delivery."""

from __future__ import annotations

import asyncio
from typing import Any

from common.bus.acks import BatchedAcks


class FakeChannel:
    is_closed = False

    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_out_of_order_completions_are_acked_only_up_to_the_first_gap() -> None:
    channel: Any = FakeChannel()
    acker = BatchedAcks(channel)
    for tag in (2, 3, 5):
        acker.ack(tag)
    await _turns()
    assert channel.acks == []  # 1 is still running
    acker.ack(1)
    await _turns()
    assert channel.acks == [(3, True)]  # 4 is still running
    acker.settled_otherwise(4)  # nacked on its own: 5 no longer waits for it
    await _turns()
    assert channel.acks == [(3, True), (5, True)]
    acker.ack(6)
    await acker.drain()
    await _turns()
    assert channel.acks == [(3, True), (5, True), (6, True)]


async def test_many_completions_in_one_turn_cost_one_ack() -> None:
    channel: Any = FakeChannel()
    acker = BatchedAcks(channel)
    for tag in range(1, 101):
        acker.ack(tag)
    await acker.drain()
    assert channel.acks == [(100, True)]


async def test_an_ack_never_names_a_delivery_settled_otherwise() -> None:
    """The broker no longer holds a nacked or rejected delivery: an ack naming its tag closes
    the channel (``unknown delivery tag``), even with ``multiple``."""
    channel: Any = FakeChannel()
    acker = BatchedAcks(channel)
    for tag in (1, 2, 3, 4):
        acker.settled_otherwise(tag)  # four failures handed back
    acker.ack(6)  # 5 is still being handled
    await _turns()
    assert channel.acks == []
    acker.settled_otherwise(5)  # handed back too: 6 no longer waits for it
    await acker.drain()
    await _turns()
    assert channel.acks == [(6, True)]
    acker.ack(7)
    acker.settled_otherwise(8)
    await acker.drain()
    await _turns()
    assert channel.acks == [(6, True), (7, True)]
