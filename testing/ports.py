"""Ports for private nodes and processes.

They come from below the kernel's ephemeral range (32768 and up on Linux, where outgoing
connections take theirs), each pytest-xdist worker from a block of its own: the kernel may give
the same free port to two processes, and two private nodes must never be given one. Ports are
handed out in rising order through the worker's block, wrapping at its end: a port comes round
again only after the block's other ports did, long after its test finished.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

PORTS_FROM = 20000
PORTS_PER_WORKER = 2000


@dataclass
class _PortCursor:
    at: int | None = None


_PORTS = _PortCursor()


def _port_block() -> range:
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    start = PORTS_FROM + worker * PORTS_PER_WORKER
    assert start + PORTS_PER_WORKER <= 32000, f"no block of ports for xdist worker {worker}"
    return range(start, start + PORTS_PER_WORKER)


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports nobody listens on now, from this worker's
    block, none handed out recently."""
    block = _port_block()
    last = block.stop - count  # the highest base whose ports all lie in the block
    start = block.start if _PORTS.at is None else _PORTS.at
    bases: list[int] = [*range(start, last + 1), *range(block.start, min(start, last + 1))]
    for base in bases:
        if all(_is_free(p) for p in range(base, base + count)):
            _PORTS.at = base + count
            return base
    raise AssertionError(f"no {count} consecutive free ports in {block}")


def free_port() -> int:
    """A port nobody listens on now, and not one this worker handed out recently."""
    return free_ports(1)


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"nothing listening on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.1)
