"""A flood from one cell: how long other cells' heartbeats wait behind it.

    python -m bench.flood [--cells 100] [--flood 20000] [--rounds 3]

N simulated cells (each with its own broker user and connection, made through the registry)
and one more that floods: it publishes ``--flood`` heartbeats as fast as its connection takes
them. Per round, measured in the same run:

- baseline: every cell sends one heartbeat at once; the time until the registry applied all;
- flood: the flooder's heartbeats are published first, then every cell sends one; the time
  until the registry applied all of the others' (they wait in the same queue, behind it).

It prints how many heartbeats per second the one flooding cell could publish, the others' delay
with and without it, and how many of the flood the registry applied. The registry runs with its
per-cell heartbeat limit (SUBSTRATE_HEARTBEAT_LIMIT_PER_SECOND, default 4/s) unless
``--no-limit``: then every heartbeat of the flood costs a Redis round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime

import aio_pika

from bench.fleet import Bench, bench_environment, until
from common.messages import CELLS_EXCHANGE, CellHeartbeat
from common.runner import run
from testing.simulator import SimCell, gather_limited


async def _everyone_beats(bench: Bench, cells: list[SimCell], handled: int) -> float:
    """Each of ``cells`` heartbeats once; the time until the registry has handled every
    delivery it was sent so far (``handled`` of them), theirs the last."""
    started = time.perf_counter()
    await asyncio.gather(*(c.heartbeat() for c in cells))
    await until(lambda: bench.registry_handled(handled), 0.01)
    return time.perf_counter() - started


async def _drained(bench: Bench) -> bool:
    return (await bench.control.queue_state("registry.cells")).messages == 0


async def _raw_flood(cell: SimCell, n: int) -> None:
    """As a cell that does not wait for confirms would: as fast as the broker lets it."""
    connection = await aio_pika.connect(cell.url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(CELLS_EXCHANGE, ensure=False)
        for _ in range(n):
            beat = CellHeartbeat(cell_id=cell.cell_id, seq=cell.next_seq(),
                                 sent_at=datetime.now(UTC), agent_version="sim")  # fmt: skip
            await exchange.publish(
                aio_pika.Message(beat.model_dump_json().encode(), type=beat.wire_name,
                                 user_id=cell.cell_id),
                f"{cell.cell_id}.heartbeat",
            )  # fmt: skip
    finally:
        await connection.close()


async def flood(args: argparse.Namespace) -> None:
    env = {
        # The registry's own default budget (None: unset), unless the round measures without one.
        "SUBSTRATE_HEARTBEAT_LIMIT_PER_SECOND": "0" if args.no_limit else None,
    }
    async with bench_environment(args.redis_db, env) as bench:
        await bench.create_cells(args.cells + 1, "fl")
        await bench.connect_cells()
        await gather_limited(len(bench.cells), 100, lambda i: bench.cells[i].register())
        flooder, others = bench.cells[0], bench.cells[1:]
        # Every delivery the registry's queue was sent (registrations first): the registry
        # has handled them all when its counter of handled deliveries reaches this.
        sent = len(bench.cells)
        await until(lambda: bench.registry_handled(sent), 0.1)
        baselines, floods, rates, drains = [], [], [], []
        for r in range(args.rounds):
            sent += len(others)
            baselines.append(await _everyone_beats(bench, others, sent))
            started = time.perf_counter()
            if args.raw:
                await _raw_flood(flooder, args.flood)
            else:
                await gather_limited(args.flood, 256, lambda _: flooder.heartbeat())
            rates.append(args.flood / (time.perf_counter() - started))
            sent += args.flood + len(others)
            backlog = (await bench.control.queue_state("registry.cells")).messages
            floods.append(await _everyone_beats(bench, others, sent))
            drains.append(backlog / floods[-1])
            await until(lambda: _drained(bench), 0.05)
            print(
                f"round {r + 1}: baseline {baselines[-1]:.2f}s, behind the flood "
                f"{floods[-1]:.2f}s (flooder published {rates[-1]:,.0f}/s; the backlog it left "
                f"drained at {drains[-1]:,.0f}/s)",
                flush=True,
            )
        # Heartbeats the registry dropped unapplied (its own count).
        limited = int(await bench.registry_metric("substrate_heartbeats_total", outcome="limited"))
    print(f"\n{args.cells} cells, one more flooding with {args.flood:,} heartbeats per round, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(f"{'every other cell applied, no flood':44}{statistics.median(baselines):>8.2f}s")
    print(f"{'every other cell applied, behind the flood':44}{statistics.median(floods):>8.2f}s")
    print(f"{'one cell publishing heartbeats':44}{statistics.median(rates):>8,.0f}/s")
    drained = statistics.median(drains)
    print(f"{'the backlog it left, drained by the registry':44}{drained:>8,.0f}/s")
    total = args.flood * args.rounds
    print(f"{'of the flood, dropped by the per-cell limit':44}{limited:>8,} of {total:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-db", type=int, default=14, help="an empty Redis database")
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--flood", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-limit", action="store_true",
                        help="run the registry without its per-cell heartbeat limit")  # fmt: skip
    parser.add_argument("--raw", action="store_true",
                        help="the flooder publishes without waiting for confirms")  # fmt: skip
    run(flood(parser.parse_args()))


if __name__ == "__main__":
    main()
