"""Helpers for tests that talk to the real broker: raw publishing (for bodies the bus would
never produce), reading a queue's messages, and bounded polling instead of sleeps."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE, CellHeartbeat
from common.topology import Binding, Topology, consuming_queue


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


def new_cell_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def cell_queue(bus: RabbitBus, cell_id: str, *kinds: str) -> str:
    """A consuming queue (with its .dead queue) bound to one cell's reports."""
    name = f"test.{cell_id}"
    bindings = [Binding(CELLS_EXCHANGE, f"{cell_id}.{kind}") for kind in kinds or ("heartbeat",)]
    await bus.declare(Topology((), consuming_queue(name, *bindings)))
    return name


def heartbeat(cell_id: str, seq: int = 1) -> CellHeartbeat:
    return CellHeartbeat(cell_id=cell_id, seq=seq, sent_at=datetime.now(UTC), agent_version="t")


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


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """The (address, port) pairs a process listens on, read from /proc (TCP, IPv4 and 6)."""
    import os
    import socket
    import struct

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = [
                    struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0])
                    for i in range(0, len(raw), 4)
                ]
                found.append((socket.inet_ntop(family, b"".join(words)), int(port_hex, 16)))
    return found
