"""A flag change reaching N cells: the flags service's one broadcast (fanned out by the broker to
every cell's command queue) next to the per-cell publishes it replaced, in the same run.

    python -m bench.broadcast [--cells 10000] [--connections 20] [--processes 2] [--rounds 3]
                              [--queue-version 1|2]

N cell command queues (the registry's topology, broadcast binding included) are declared on a
vhost of the bench's own, each with a consumer. The consumers run in worker processes of their
own (``--processes``), over a few connections each: agents are processes apart from the flags
service, and a consumer sharing the pusher's process would add its CPU to the time. A round
times from the start of the push until every cell has its message, for:

- broadcast: the flags service's own push (``Pusher.push_all``), run in this process,
  counting what it published, with its view of the fleet holding the N cells (it reads it for
  the cells a condition names: none here);
- raw fan-out: one persistent message published with raw aio-pika to the broadcast exchange,
  the broker's own floor for the same delivery;
- raw transient fan-out: the same message not persistent, which the architecture rules out
  (every publish is persistent) but a broadcast could afford, since a cell that lost it in a
  broker restart syncs when it reconnects: what that rule costs a broadcast;
- per cell: one confirmed FlagsSnapshot per cell through RabbitBus, 200 in flight (the previous
  push), the baseline.

The queues, the vhost and the Redis database (14) are removed at the end, also on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bench.fleet import AMQP_URL, API_URL, REDIS_URL, _with_path, remove_vhost
from common.bus.rabbit_bus import RabbitBus
from common.clock import SystemClock
from common.messages import (
    BROADCAST_EXCHANGE,
    CellRegistered,
    FlagsBroadcast,
    FlagsSnapshot,
    command_queue,
)
from common.rabbitmq_api import RabbitApi
from common.topology import cell_commands, control_plane
from services.flags import metrics
from services.flags.push import Pusher
from services.flags.store import FlagsStore
from testing.simulator import gather_limited, stop_workers

REDIS_DB = 14


class Cells:
    """A worker's share of the command queues, with a consumer each; ``arrived`` is set once
    every one of them has one more message than at ``expect``."""

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


async def worker(url: str, ids_file: str, connections: int) -> None:
    """A consumer process: answers ``ready`` once consuming, ``expecting`` to each ``expect``
    line on stdin, and prints ``arrived`` once each of its cells has had its message."""
    cells = Cells(json.loads(await asyncio.to_thread(Path(ids_file).read_text)))
    opened = await consume(url, cells, connections)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    try:
        while (await reader.readline()).strip() == b"expect":
            cells.expect()
            print("expecting", flush=True)
            await cells.arrived.wait()
            print("arrived", flush=True)
    finally:
        for connection in opened:
            await connection.close()


class Workers:
    """The consumer processes, from the pusher's side."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes

    @classmethod
    async def start(cls, url: str, ids: list[str], n: int, connections: int, workdir: Path
                    ) -> Workers:  # fmt: skip
        processes = []
        for w in range(n):
            path = workdir / f"cells-{w}.json"
            path.write_text(json.dumps(ids[w::n]))
            processes.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.broadcast", "worker", url, str(path),
                str(max(1, connections // n)),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))  # fmt: skip
        workers = cls(processes)
        await workers.each("ready")
        return workers

    async def each(self, expected: str) -> None:
        for i, process in enumerate(self.processes):
            assert process.stdout is not None
            line = (await process.stdout.readline()).decode().strip()
            if line != expected:
                raise RuntimeError(f"consumer process {i} said {line!r}, not {expected!r}")

    async def timed(self, push: Callable[[], Awaitable[None]]) -> float:
        """Seconds from the start of ``push`` until every cell has one more message."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(b"expect\n")
            await process.stdin.drain()
        await self.each("expecting")
        started = time.perf_counter()
        await push()
        await asyncio.wait_for(self.each("arrived"), 300)
        return time.perf_counter() - started

    async def stop(self) -> None:
        await stop_workers(self.processes)


async def measure(
    args: argparse.Namespace,
    bus: RabbitBus,
    *,
    raw: AbstractConnection,
    redis: aioredis.Redis,
    workers: Workers,
    ids: list[str],
) -> None:
    """The rounds: the flags service's broadcast, raw aio-pika's, and the per-cell baseline."""
    store = FlagsStore(redis)
    # The flags service's view of the fleet, as the registry's events make it: the push reads
    # it to find the cells a condition names (none here: every cell reads the broadcast).
    now = datetime.now(UTC)
    await gather_limited(args.cells, 200, lambda i: store.fleet.apply(CellRegistered(
        at=now, cell_id=ids[i], stage="dedicated", region="eu-west-1", org=f"org-{i % 50}",
        aws_account_id="123456789012", agent_version="1")))  # fmt: skip
    pusher = Pusher(bus, store, SystemClock())
    sent = metrics.PUSHED.labels("change", "sent")
    snapshot = await FlagsStore(redis).snapshot()
    raw_channel = await raw.channel(publisher_confirms=True)
    exchange = await raw_channel.get_exchange(BROADCAST_EXCHANGE, ensure=False)
    message = FlagsBroadcast(
        issued_at=datetime.now(UTC), version=snapshot.version, flags=tuple(snapshot.to_wire())
    )
    body = message.model_dump_json().encode()

    def fan_out(mode: aio_pika.DeliveryMode) -> Callable[[], Awaitable[None]]:
        async def publish() -> None:
            await exchange.publish(
                aio_pika.Message(body, type=FlagsBroadcast.wire_name, delivery_mode=mode),
                routing_key="",
            )

        return publish

    async def per_cell() -> None:
        async def one(i: int) -> None:
            await bus.publish(FlagsSnapshot(
                cell_id=ids[i], issued_at=datetime.now(UTC), version=snapshot.version,
                flags=tuple(snapshot.to_wire()), cell={"stage": "dedicated"}))  # fmt: skip

        await gather_limited(args.cells, 200, one)

    times: dict[str, list[float]] = {"broadcast": [], "raw": [], "transient": [], "per-cell": []}
    for _ in range(args.rounds):
        before = sent._value.get()
        times["broadcast"].append(await workers.timed(pusher.push_all))
        published = sent._value.get() - before
        times["raw"].append(await workers.timed(fan_out(aio_pika.DeliveryMode.PERSISTENT)))
        times["transient"].append(
            await workers.timed(fan_out(aio_pika.DeliveryMode.NOT_PERSISTENT))
        )
        times["per-cell"].append(await workers.timed(per_cell))
        last = {name: t[-1] for name, t in times.items()}
        print(f"  broadcast {last['broadcast']:.2f}s ({published:.0f} message published); raw "
              f"fan-out {last['raw']:.2f}s (transient {last['transient']:.2f}s); per cell "
              f"{last['per-cell']:.2f}s ({args.cells} messages published)",
              flush=True)  # fmt: skip
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"a flag change reaching {args.cells} cells, median of {args.rounds}: broadcast "
          f"{median['broadcast']:.2f}s (1 message published); raw aio-pika fan-out of one "
          f"persistent message (floor) {median['raw']:.2f}s, of a transient one "
          f"{median['transient']:.2f}s; per-cell publishes (baseline) "
          f"{median['per-cell']:.2f}s ({args.cells} messages published)")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    api = RabbitApi(API_URL, timeout=300)
    redis = aioredis.from_url(_with_path(REDIS_URL, f"/{REDIS_DB}"), decode_responses=True)
    if await redis.dbsize():
        await redis.aclose()
        raise SystemExit(f"Redis database {REDIS_DB} is not empty (another benchmark running?)")
    vhost = f"substrate-bench-{uuid.uuid4().hex[:6]}"
    await api.create_vhost(vhost)
    await api.set_permissions(vhost, "guest", configure=".*", write=".*", read=".*")
    if args.queue_version != 1:
        # A policy, as an operator would give an existing fleet: a queue's arguments are fixed.
        await api.call("PUT", f"/policies/{quote(vhost, safe='')}/cell-queue-version", {
            "pattern": r"^cell\..*\.commands$", "apply-to": "queues",
            "definition": {"queue-version": args.queue_version}})  # fmt: skip
    url = _with_path(AMQP_URL, "/" + quote(vhost, safe=""))
    workdir = Path(tempfile.mkdtemp(prefix=f"{vhost}-"))
    # Stopped with SIGTERM (or Ctrl-C), it cleans up like a run that finished.
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    ids = [f"b{i:06d}" for i in range(args.cells)]
    bus = await RabbitBus.connect(url, name="bench-broadcast")
    raw = await aio_pika.connect(url)
    workers: Workers | None = None
    try:
        await bus.declare(control_plane())
        started = time.perf_counter()
        await gather_limited(args.cells, 32, lambda i: bus.declare(cell_commands(ids[i])))
        print(f"{args.cells} command queues declared in {time.perf_counter() - started:.1f}s",
              flush=True)  # fmt: skip
        workers = await Workers.start(url, ids, args.processes, args.connections, workdir)
        await measure(args, bus, raw=raw, redis=redis, workers=workers, ids=ids)
    finally:
        if workers is not None:
            await workers.stop()
        await raw.close()
        await bus.close(drain_timeout=1)
        await remove_vhost(api, url, vhost)
        await redis.flushdb()
        await redis.aclose()
        shutil.rmtree(workdir, ignore_errors=True)


def cli() -> None:
    if sys.argv[1:2] == ["worker"]:
        url, ids_file, connections = sys.argv[2:5]
        asyncio.run(worker(url, ids_file, int(connections)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=20, help="over all processes")
    parser.add_argument("--processes", type=int, default=2, help="consumer processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--queue-version", type=int, choices=(1, 2), default=1,
        help="classic queue version of the cells' queues (2: by a policy)",
    )  # fmt: skip
    args = parser.parse_args()
    if min(args.cells, args.connections, args.processes, args.rounds) < 1:
        parser.error("--cells, --connections, --processes and --rounds must be at least 1")
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
