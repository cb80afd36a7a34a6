"""Bus throughput next to raw aio-pika, measured in the same run on the same broker.

    python -m bench.bus [--messages N] [--window W] [--rounds R]

Publish: N persistent messages with publisher confirms, W in flight at once, to a quorum
queue. Consume: the same N with manual ack and prefetch W. The bus adds what raw aio-pika
does not: mandatory returns, user_id, type, a timeout, validation into the pydantic model,
metrics and the handler call. Each figure is the median of R rounds, alternating raw and bus.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika

from bench.baseline import raw_drain
from common import topology
from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE, CellHeartbeat, Delivery
from common.routes import route
from common.runner import run
from common.topology import Binding, Topology, consuming_queue

AMQP_URL = os.environ.get("SUBSTRATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def sample() -> CellHeartbeat:
    return CellHeartbeat(
        cell_id="bench-cell",
        seq=1,
        sent_at=datetime.now(UTC),
        agent_version="1.0.0",
        installed_release="2026.11.3",
        applied_generation=12,
        template_version="7",
        flags_snapshot_version=40,
    )


async def windowed(n: int, window: int, one: Callable[[int], Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(window)

    async def run(i: int) -> None:
        try:
            await one(i)
        finally:
            gate.release()

    tasks = set()
    for i in range(n):
        await gate.acquire()
        task = asyncio.create_task(run(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def raw_round(queue: str, n: int, window: int) -> tuple[float, float]:
    connection = await aio_pika.connect(AMQP_URL)
    body = sample().model_dump_json().encode()
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(CELLS_EXCHANGE, ensure=False)

        async def publish(i: int) -> None:
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=uuid.uuid4().hex,
            )
            await exchange.publish(message, queue)

        started = time.perf_counter()
        await windowed(n, window, publish)
        publish_rate = n / (time.perf_counter() - started)

        consume_rate = await raw_drain(AMQP_URL, queue, n, window)
        return publish_rate, consume_rate
    finally:
        await connection.close()


async def bus_round(queue: str, n: int, window: int) -> tuple[float, float]:
    bus = await RabbitBus.connect(AMQP_URL, name="bench-bus")
    message = sample()
    try:

        async def publish(i: int) -> None:
            await bus.publish(message, routing_key=queue)

        started = time.perf_counter()
        await windowed(n, window, publish)
        publish_rate = n / (time.perf_counter() - started)

        done = asyncio.Event()
        seen = 0

        async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
            nonlocal seen
            seen += 1
            if seen == n:
                done.set()

        started = time.perf_counter()
        await bus.consume(queue, [route(CellHeartbeat, on_heartbeat)], prefetch=window)
        await done.wait()
        consume_rate = n / (time.perf_counter() - started)
        return publish_rate, consume_rate
    finally:
        await bus.close(drain_timeout=5)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    setup = await RabbitBus.connect(AMQP_URL, name="bench-setup")
    # The exchanges the benchmark's queues bind to (idempotent): a fresh broker has none.
    await setup.declare(topology.control_plane())
    queues = {kind: f"bench.{kind}.{uuid.uuid4().hex[:6]}" for kind in ("raw", "bus")}
    for name in queues.values():
        # Bound by its own name on the cells exchange, so publishing to it needs no extra
        # exchange and both sides route identically.
        await setup.declare(Topology((), consuming_queue(name, Binding(CELLS_EXCHANGE, name))))
    results: dict[str, list[tuple[float, float]]] = {"raw": [], "bus": []}
    try:
        for r in range(args.rounds):
            results["raw"].append(await raw_round(queues["raw"], args.messages, args.window))
            results["bus"].append(await bus_round(queues["bus"], args.messages, args.window))
            print(
                f"round {r + 1}: raw publish {results['raw'][-1][0]:,.0f}/s "
                f"consume {results['raw'][-1][1]:,.0f}/s | bus publish "
                f"{results['bus'][-1][0]:,.0f}/s consume {results['bus'][-1][1]:,.0f}/s",
                flush=True,
            )
    finally:
        for name in queues.values():
            await setup.delete_queue(name)
            await setup.delete_queue(f"{name}.dead")
        await setup.close()

    def median(kind: str, i: int) -> float:
        return statistics.median(x[i] for x in results[kind])

    print(f"\n{args.messages:,} messages, window {args.window}, median of {args.rounds} rounds")
    print(f"{'':10}{'raw aio-pika':>16}{'bus':>12}{'bus/raw':>10}{'target':>9}")
    for label, i, target in (("publish", 0, 0.95), ("consume", 1, 1.00)):
        raw, bus = median("raw", i), median("bus", i)
        print(f"{label:10}{raw:>14,.0f}/s{bus:>10,.0f}/s{bus / raw:>10.0%}{target:>9.0%}")


if __name__ == "__main__":
    # The services' event loop (uvloop where installed), for the bus and the baseline alike.
    run(main())
