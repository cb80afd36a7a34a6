"""What holding a fleet costs with nothing happening: the CPU the broker (and the registry,
Redis, the simulated cells) spend while N cells are connected and consuming, and nothing is
sent.

    python -m bench.rest [--cells 10000] [--seconds 20]

Readings of ``--seconds`` each: the broker with the benchmark's registry and no cell connected
(the baseline, same run), then the N cells connected, each consuming its command queue,
registered and online, read twice (the first still holds the registry's outbox publishing the
registrations' events). In a rollout every second a round lasts costs the broker the second
figure again (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

from bench.fleet import (
    Bench,
    CpuMeter,
    bench_environment,
    broker_and_redis_pids,
    queues_empty,
    until,
)
from common.runner import run
from testing.simulator import Simulators


async def main(args: argparse.Namespace) -> None:
    async with bench_environment(args.redis_db) as bench:
        meter = CpuMeter({**await broker_and_redis_pids(bench), "registry": bench.registry_pids})

        async def at_rest(label: str, parts: CpuMeter) -> None:
            spent = await parts.over(args.seconds)
            print(f"{label:34}{CpuMeter.line(spent, args.seconds)}", flush=True)

        await at_rest("baseline: no cell connected", meter)
        await bench.create_cells(args.cells, "rest")
        sims = await bench.simulate(0)
        try:
            await settle(bench, sims, args.cells)
            parts = CpuMeter({**meter.parts, "simulators": [p.pid for p in sims.processes]})
            await at_rest(f"{args.cells} cells connected", parts)
            await at_rest(f"{args.cells} cells connected, again", parts)
        finally:
            await sims.stop()


async def settle(bench: Bench, sims: Simulators, cells: int) -> None:
    """Every cell connected, consuming, registered and online, and the registry's queues empty."""
    started = time.perf_counter()
    await sims.command("connect", "connected")
    await sims.command("answer", "answering")
    await sims.command("register", "registered")
    print(f"  {cells} cells connected and registering in {time.perf_counter() - started:.1f}s",
          flush=True)  # fmt: skip

    async def settled() -> bool:
        return await bench.online_count() >= cells and await queues_empty(
            bench.control, "registry.cells", "registry.events"
        )

    await until(settled, 0.5)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-db", type=int, default=14, help="an empty Redis database")
    parser.add_argument("--cells", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=20.0)
    run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
