"""A flag change reaching N cells: the flags service's one broadcast (fanned out by the broker to
every cell's command queue) next to the per-cell publishes it replaced, in the same run.

    python -m bench.broadcast [--cells 10000] [--connections 20] [--rounds 3]

N cell command queues (the registry's topology, broadcast binding included) are declared on a
vhost of the bench's own, each with a consumer (spread over a few connections, as the agents'
would be over theirs). A round times from the start of the push until every cell has its
message, for:

- broadcast: ``Pusher.push_all`` of the flags service, counting what it published;
- per cell: one confirmed FlagsSnapshot per cell through RabbitBus, 200 in flight (the previous
  push), the baseline.

The vhost, its queues and the Redis database (14) are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bench.fleet import AMQP_URL, API_URL, REDIS_URL, _with_path
from bench.simulator import gather_limited
from common.bus import RabbitBus
from common.clock import SystemClock
from common.messages import FlagsSnapshot, command_queue
from common.rabbitmq_api import RabbitApi
from common.topology import cell_commands, control_plane
from services.flags import metrics
from services.flags.bootstrap import Pusher
from services.flags.store import FlagsStore

REDIS_DB = 14


class Cells:
    """N command queues with a consumer each; ``arrived`` is set once every cell has one more
    message than at ``expect``."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.seen = 0
        self.target = 0
        self.arrived = asyncio.Event()

    def expect(self) -> None:
        self.target = self.seen + len(self.ids)
        self.arrived.clear()

    def on_message(self, message: AbstractIncomingMessage) -> None:
        self.seen += 1
        if self.seen >= self.target:
            self.arrived.set()


async def consume(
    url: str, cells: Cells, connections: int
) -> list[aio_pika.abc.AbstractConnection]:
    opened: list[AbstractConnection] = []
    share = -(-len(cells.ids) // connections)
    for start in range(0, len(cells.ids), share):
        connection: AbstractConnection = await aio_pika.connect(url)
        opened.append(connection)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)

        async def on_message(message: AbstractIncomingMessage) -> None:
            cells.on_message(message)
            await message.ack()

        for cell in cells.ids[start : start + share]:
            queue = await channel.get_queue(command_queue(cell), ensure=False)
            await queue.consume(on_message)
    return opened


async def timed(cells: Cells, push: asyncio.Future[None] | asyncio.Task[None]) -> float:
    started = time.perf_counter()
    await push
    await asyncio.wait_for(cells.arrived.wait(), 300)
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    # Deleting a vhost of 10,000 queues takes longer than the API client's default 10 s.
    api = RabbitApi(API_URL, timeout=300)
    vhost = f"substrate-bench-{uuid.uuid4().hex[:6]}"
    await api.create_vhost(vhost)
    await api.set_permissions(vhost, "guest", configure=".*", write=".*", read=".*")
    url = _with_path(AMQP_URL, "/" + quote(vhost, safe=""))
    redis = aioredis.from_url(_with_path(REDIS_URL, f"/{REDIS_DB}"), decode_responses=True)
    bus = await RabbitBus.connect(url, name="bench-broadcast")
    opened: list[AbstractConnection] = []
    try:
        await bus.declare(control_plane())
        cells = Cells([f"b{i:06d}" for i in range(args.cells)])
        started = time.perf_counter()
        await gather_limited(args.cells, 32, lambda i: bus.declare(cell_commands(cells.ids[i])))
        print(f"{args.cells} command queues declared in {time.perf_counter() - started:.1f}s",
              flush=True)  # fmt: skip
        opened = await consume(url, cells, args.connections)
        pusher = Pusher(bus, FlagsStore(redis), SystemClock())
        sent = metrics.PUSHED.labels("change", "sent")
        snapshot = await FlagsStore(redis).snapshot()

        async def per_cell() -> None:
            async def one(i: int) -> None:
                await bus.publish(FlagsSnapshot(
                    cell_id=cells.ids[i], issued_at=datetime.now(UTC), version=snapshot.version,
                    flags=tuple(snapshot.to_wire()), cell={"stage": "dedicated"}))  # fmt: skip

            await gather_limited(args.cells, 200, one)

        broadcast_times, per_cell_times = [], []
        for _ in range(args.rounds):
            cells.expect()
            before = sent._value.get()
            broadcast_times.append(await timed(cells, asyncio.ensure_future(pusher.push_all())))
            published = sent._value.get() - before
            cells.expect()
            per_cell_times.append(await timed(cells, asyncio.ensure_future(per_cell())))
            print(f"  broadcast {broadcast_times[-1]:.2f}s ({published:.0f} message published); "
                  f"per cell {per_cell_times[-1]:.2f}s ({args.cells} messages published)",
                  flush=True)  # fmt: skip
        print(f"a flag change reaching {args.cells} cells, median of {args.rounds}: broadcast "
              f"{statistics.median(broadcast_times):.2f}s (1 message published); per-cell "
              f"publishes (baseline) {statistics.median(per_cell_times):.2f}s "
              f"({args.cells} messages published)")  # fmt: skip
    finally:
        for connection in opened:
            await connection.close()
        await bus.close(drain_timeout=1)
        await api.delete_vhost(vhost)
        await redis.flushdb()
        await redis.aclose()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.cells < 1 or args.connections < 1 or args.rounds < 1:
        parser.error("--cells, --connections and --rounds must be at least 1")
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
