"""Rollout speed: N simulated dedicated cells, zero soak, an instant applier.

    python -m bench.rollout [--cells 1000] [--rounds 2] [--processes N] [--with-flags]
                            [--bake SECONDS]

Each simulated cell has its own broker user and connection (made through the registry; the
cells are spread over simulator processes, testing/simulator.py) and
answers a desired state as an agent with an instant applier does: it reports succeeded for that
generation (its phases on the way are over before they are worth reporting). The benchmark
measures, per round:

- baseline: the same fan-out with no rollout logic: one desired state published straight to
  every cell's queue, until every cell's `succeeded` report is back (the floor the broker and
  the simulated cells set);
- rollout: from `release publish` to every cell updated, through the rollout service's
  stages and waves (a canary, then 10%, 50%, 100% of the rest);

and the control plane's CPU seconds (rollout + registry processes, from /proc) per cell
updated. The targets: 1,000 cells updated within 10 seconds, 10,000 within 20. With
``--bake``, every release carries a health check with that bake (the simulated cells answer a
bake of 0 with their outcome and a healthy verdict in one report, as agents do), in both the
baseline and the rollout.

Every part shares this machine's cores, so each round also says where the CPU went: the
broker, Redis, the simulated cells (which in a real fleet run on machines of their own), the
registry and the rollout service. What the control plane's side spent (all but the simulators),
over the cores, is the least time this machine could take with the cells elsewhere.

It reaches into one service once: before the rollout service starts it sets the service's
generation counter (``rollout:generation`` in Redis) far above the baseline's generations, so
that every generation the service sends is newer than any a simulated cell applied in a
baseline round (a cell applies only a newer generation). The baseline's reports reach the
rollout service too; it refuses them, as it refuses any outcome for what it did not send.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from bench.fleet import (
    Bench,
    CpuMeter,
    bench_environment,
    broker_and_redis_pids,
    events_taken_in,
    online_at_least,
    until,
)
from common.health import HealthSpec, ReleaseHealth
from common.messages import DesiredState
from common.releases import Component, Release
from common.requests.rollout import (
    PolicySet,
    ReleaseFile,
    ReleasePublish,
    RolloutPolicy,
    RolloutShow,
    SoakTimes,
)
from common.runner import run
from testing.simulator import CELLS_PER_PROCESS, Simulators, gather_limited

DIGEST = "sha256:" + "b" * 64
ROLLOUT_GENERATIONS = 10_000_000
IDLE_SECONDS = 20.0


CHECK = {"name": "up", "type": "command", "command": ["true"]}


def release(version: str, bake: float | None = None) -> Release:
    health = None if bake is None else ReleaseHealth(checks=(CHECK,), bake_seconds=bake)
    return Release(
        version=version,
        components=(Component(name="server", image="r/s", digest=DIGEST),),
        health=health,
    )


def publish(version: str, bake: float | None = None) -> ReleasePublish:
    """The operator's request that publishes ``release(version)`` (and starts its rollout)."""
    return ReleasePublish(
        release=ReleaseFile.model_validate(
            release(version, bake).model_dump(mode="json", exclude_none=True)
        )
    )


# Soaks of nothing: a benchmark's rollout measures the waves, not the waiting between them.
NO_SOAKS = PolicySet(policy=RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=0)))


Spent = dict[str, float]


async def baseline_round(
    bench: Bench, sims: Simulators, generation: int, meter: CpuMeter, bake: float | None = None
) -> tuple[float, Spent]:
    """Desired states straight to every queue, until every cell reports succeeded."""
    await sims.command("forget", "forgot")
    rel = release(f"0.0.{generation}", bake)
    health = None if bake is None else HealthSpec(checks=(CHECK,), bake_seconds=bake)
    cpu_before = meter.read()
    started = time.perf_counter()

    async def send(i: int) -> None:
        await bench.control.publish(
            DesiredState(
                cell_id=bench.cells[i].cell_id,
                issued_at=datetime.now(UTC),
                generation=generation,
                release=rel,
                health=health,
            ),
            # The bus's 10 s was once not enough with 10,000 cells keeping the broker busy (no
            # alarm): the round then failed. The rollout's outbox retries where this would not.
            confirm_timeout=60,
        )

    await gather_limited(len(bench.cells), 200, send)
    await sims.all_updated(rel.version)
    return time.perf_counter() - started, meter.since(cpu_before)


async def rollout_round(
    bench: Bench, sims: Simulators, version: str, meter: CpuMeter, bake: float | None = None
) -> tuple[float, Spent]:
    """From publishing the release to every cell's `succeeded` report for it (as the
    simulators count them, so the measurement does not load the service with status requests)."""
    cpu_before = meter.read()
    started = time.perf_counter()
    await bench.control.call(publish(version, bake))
    await sims.all_updated(version)
    elapsed = time.perf_counter() - started
    spent = meter.since(cpu_before)

    async def completed() -> bool:
        status = await bench.control.call(RolloutShow(version=version), timeout=60)
        return status.state == "completed"

    await until(completed, 0.2)
    return elapsed, spent


async def main(args: argparse.Namespace) -> None:
    async with bench_environment(args.redis_db) as bench:
        await bench.create_cells(args.cells, "ro")
        sims = await bench.simulate(args.processes)
        processes = len(sims.processes)
        try:
            started = time.perf_counter()
            await sims.command("connect", "connected")
            print(f"  {args.cells} cells connected from {processes} processes in "
                  f"{time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
            await sims.command("answer", "answering")
            await sims.command("register", "registered")
            # The baseline sends generations 1, 2, ...; the rollout's start far above them, so a
            # baseline report never looks like (or hides) a report of the rollout's.
            redis = aioredis.from_url(bench.redis_url)
            await redis.set("rollout:generation", ROLLOUT_GENERATIONS)
            await redis.aclose()
            await bench.start_service("rollout")
            if args.with_flags:
                # Flags takes the same upgrade reports in a deployment; without it its queue
                # only gathers them.
                await bench.start_service("flags")
            meter = CpuMeter({
                **await broker_and_redis_pids(bench),
                "simulators": [p.pid for p in sims.processes],
                "registry": bench.registry_pids,
                **{name: [process.pid] for name, process in bench.services.items()},
                # The baseline's publisher of desired states (the rollout's stand-in).
                "bench": [os.getpid()],
            })  # fmt: skip
            try:
                baselines, rollouts = await rounds(bench, sims, meter, args)
            finally:
                await bench.stop_services()
        finally:
            await sims.stop()
    report(args, baselines, rollouts)


def report(
    args: argparse.Namespace,
    baselines: list[tuple[float, Spent]],
    rollouts: list[tuple[float, Spent]],
) -> None:
    base, elapsed = (statistics.median(t for t, _ in runs) for runs in (baselines, rollouts))
    target = "20 s (10,000 cells)" if args.cells > 1000 else "10 s (1,000 cells)"
    print(f"\n{args.cells} dedicated cells, zero soak, instant applier; median of {args.rounds}")
    print(f"{'baseline: one desired state to every cell, all reports back':62}{base:>7.2f}s")
    print(f"{'rollout: publish -> canary, 10%, 50%, 100% -> all updated':62}{elapsed:>7.2f}s"
          f"   target {target}")  # fmt: skip
    per_cell = statistics.median(control_plane(s) for _, s in rollouts) / args.cells * 1000
    parts = "rollout + registry" + (" + flags" if args.with_flags else "")
    print(f"{'control plane CPU (' + parts + ') per cell updated':62}{per_cell:>6.2f}ms")
    cores = os.cpu_count() or 1
    for name, runs in (("baseline", baselines), ("rollout", rollouts)):
        # The least wall time the parts an operator runs could take on these cores, had the
        # simulated cells' CPU been spent on machines of their own.
        floor = statistics.median(sum(s.values()) - s.get("simulators", 0) for _, s in runs) / cores
        print(f"{name + ': CPU of all but the simulators, over ' + str(cores) + ' cores':62}"
              f"{floor:>7.2f}s")  # fmt: skip


def control_plane(spent: Spent) -> float:
    return spent["registry"] + spent["rollout"] + spent.get("flags", 0.0)


async def rounds(
    bench: Bench, sims: Simulators, meter: CpuMeter, args: argparse.Namespace
) -> tuple[list[tuple[float, Spent]], list[tuple[float, Spent]]]:
    await bench.control.call(NO_SOAKS)

    # Every cell registered and known to rollout (from the registry's events).
    await until(lambda: online_at_least(bench, args.cells), 0.2)

    # Until the services have taken in the registrations' events (rollout starts with them
    # all queued, and the registry's outbox may still hold some), so that the fleet is at rest
    # below.
    inputs = [f"{name}.{queue}" for name in ("registry", *bench.services)
              for queue in ("cells", "events")]  # fmt: skip
    await until(lambda: events_taken_in(bench, inputs), 0.5)
    # What holding the fleet costs with nothing happening (connections' heartbeats, the
    # management plugin's statistics): a share of every round below.
    spent = await meter.over(IDLE_SECONDS)
    print(f"at rest for {IDLE_SECONDS:.0f}s: {CpuMeter.line(spent, IDLE_SECONDS)}", flush=True)
    baselines, rollouts = [], []
    for n in range(args.rounds):
        base, base_cpu = await baseline_round(bench, sims, n + 1, meter, args.bake)
        elapsed, cpu = await rollout_round(bench, sims, f"1.0.{n}", meter, args.bake)
        baselines.append((base, base_cpu))
        rollouts.append((elapsed, cpu))
        control = control_plane(cpu)
        print(f"round {n + 1}: baseline fan-out {base:.2f}s, rollout {elapsed:.2f}s, "
              f"control plane CPU {control:.2f}s ({control / args.cells * 1000:.2f} ms per cell)\n"
              f"  baseline CPU: {CpuMeter.line(base_cpu, base)}\n"
              f"  rollout CPU:  {CpuMeter.line(cpu, elapsed)}", flush=True)  # fmt: skip
    return baselines, rollouts


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-db", type=int, default=14, help="an empty Redis database")
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help=f"simulator processes (default: one per {CELLS_PER_PROCESS} cells)",
    )
    parser.add_argument(
        "--with-flags", action="store_true", help="run the flags service too, as deployed"
    )
    parser.add_argument(
        "--bake",
        type=float,
        default=None,
        help="releases carry a health check with this bake (seconds; 0: judged at once)",
    )
    run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
