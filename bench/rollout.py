"""Rollout speed: N simulated dedicated cells, zero soak, an instant applier.

    python -m bench.rollout [--cells 1000] [--rounds 2]

Each simulated cell has its own broker user and connection (made through the registry) and
answers a desired state as an agent with an instant applier does: it reports accepted,
verifying, applying and succeeded for that generation. The benchmark measures, per round:

- baseline: the same fan-out with no rollout logic: one desired state published straight to
  every cell's queue, until every cell's `succeeded` report is back (the floor the broker and
  the simulated cells set);
- rollout: from `release publish` to every cell updated, through the rollout service's
  stages and waves (a canary, then 10%, 50%, 100% of the rest);

and the control plane's CPU seconds (rollout + registry processes, from /proc) per cell
updated. The target is all cells updated within 10 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as aioredis

from bench.fleet import (
    API_URL,
    BIN,
    Bench,
    SimCell,
    bench_environment,
    cpu_seconds,
    gather_limited,
    until,
)
from common.messages import (
    CELLS_EXCHANGE,
    CellUpgrade,
    Component,
    Delivery,
    DesiredState,
    Release,
    command_queue,
)
from common.routes import route
from common.runner import run
from common.topology import Binding, Topology, consuming_queue
from common.vocabulary import UpgradePhase

DIGEST = "sha256:" + "b" * 64
ROLLOUT_GENERATIONS = 10_000_000


def release(version: str) -> Release:
    return Release(
        version=version, components=(Component(name="server", image="r/s", digest=DIGEST),)
    )


@dataclass
class Responder:
    """A simulated cell's command handler: an agent with an instant applier."""

    cell: SimCell
    applied: int = 0
    reports: list[int] = field(default_factory=list)

    async def on_desired_state(self, msg: DesiredState, delivery: Delivery) -> None:
        if msg.generation <= self.applied:
            return
        self.applied = msg.generation
        version = msg.release.version if msg.release else None
        assert self.cell.bus is not None
        phases: tuple[UpgradePhase, ...] = ("accepted", "verifying", "applying", "succeeded")
        for phase in phases:
            await self.cell.bus.publish(
                CellUpgrade(cell_id=self.cell.cell_id, seq=self.cell.next_seq(),
                            sent_at=datetime.now(UTC), generation=msg.generation,
                            release_version=version, phase=phase)
            )  # fmt: skip


async def start_rollout(bench: Bench) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "SUBSTRATE_AMQP_URL": bench.amqp_url,
        "SUBSTRATE_REDIS_URL": bench.redis_url,
        "SUBSTRATE_RABBITMQ_API_URL": API_URL,
        "SUBSTRATE_LOG_LEVEL": "WARNING",
    }
    log = (bench.workdir / "rollout.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        str(BIN / "substrate-rollout"), env=env, stdout=log, stderr=log
    )

    async def answers() -> bool:
        try:
            await bench.control.request("rollout", "status", timeout=2)
            return True
        except Exception:
            return False

    await until(answers, 0.1)
    return process


async def baseline_round(bench: Bench, tap: list[CellUpgrade], generation: int) -> float:
    """Desired states straight to every queue, until every cell reports succeeded."""
    tap.clear()
    rel = release(f"0.0.{generation}")
    started = time.perf_counter()

    async def send(i: int) -> None:
        await bench.control.publish(
            DesiredState(
                cell_id=bench.cells[i].cell_id,
                issued_at=datetime.now(UTC),
                generation=generation,
                release=rel,
            )
        )

    await gather_limited(len(bench.cells), 200, send)

    async def all_back() -> bool:
        done = {r.cell_id for r in tap if r.phase == "succeeded" and r.generation == generation}
        return len(done) >= len(bench.cells)

    await until(all_back, 0.01)
    return time.perf_counter() - started


async def rollout_round(
    bench: Bench, tap: list[CellUpgrade], version: str, pids: list[int]
) -> tuple[float, float]:
    """From publishing the release to every cell's `succeeded` report for it (watched on the
    report tap, so the measurement does not load the service with status requests)."""
    tap.clear()
    cpu_before = sum(cpu_seconds(p) for p in pids)
    started = time.perf_counter()
    await bench.control.request("rollout", "release.publish",
                                {"release": release(version).model_dump(mode="json")})  # fmt: skip

    async def all_updated() -> bool:
        done = {r.cell_id for r in tap if r.phase == "succeeded" and r.release_version == version}
        return len(done) >= len(bench.cells)

    await until(all_updated, 0.01)
    elapsed = time.perf_counter() - started
    cpu = sum(cpu_seconds(p) for p in pids) - cpu_before

    async def completed() -> bool:
        status = await bench.control.request("rollout", "rollout.status", {"version": version})
        return bool(status["state"] == "completed")

    await until(completed, 0.1)
    return elapsed, cpu


async def main(args: argparse.Namespace) -> None:
    async with bench_environment(args.redis_db) as bench:
        await bench.create_cells(args.cells, "ro")
        took = await bench.connect_cells()
        print(f"  {args.cells} cells connected in {took:.1f}s", flush=True)
        responders = [Responder(c) for c in bench.cells]
        for r in responders:
            assert r.cell.bus is not None
            await r.cell.bus.consume(command_queue(r.cell.cell_id),
                                     [route(DesiredState, r.on_desired_state)])  # fmt: skip
        await gather_limited(args.cells, 200, lambda i: bench.cells[i].register())

        tap: list[CellUpgrade] = []
        tap_queue = "bench.upgrade-reports"
        await bench.control.declare(
            Topology((), consuming_queue(tap_queue, Binding(CELLS_EXCHANGE, "*.upgrade")))
        )

        async def on_report(msg: CellUpgrade, delivery: Delivery) -> None:
            tap.append(msg)

        await bench.control.consume(tap_queue, [route(CellUpgrade, on_report)], prefetch=500)

        # The baseline sends generations 1, 2, ...; the rollout's start far above them, so a
        # baseline report never looks like (or hides) a report of the rollout's.
        redis = aioredis.from_url(bench.redis_url)
        await redis.set("rollout:generation", ROLLOUT_GENERATIONS)
        await redis.aclose()
        rollout = await start_rollout(bench)
        try:
            await bench.control.request("rollout", "rollout.policy.set", {"policy": {
                "soak_seconds": {"staging": 0, "saas": 0, "dedicated": 0}}})  # fmt: skip

            # Every cell registered and known to rollout (from the registry's events).
            async def all_online() -> bool:
                status = await bench.control.request("registry", "status", timeout=30)
                return bool(int(status["cells"].get("online", 0)) >= args.cells)

            await until(all_online, 0.2)
            assert bench.registry is not None
            pids = [rollout.pid, bench.registry.pid]
            baselines, rollouts, cpus = [], [], []
            for n in range(args.rounds):
                for r in responders:
                    r.applied = 0  # the baseline's generation is below the rollout's last
                base = await baseline_round(bench, tap, n + 1)
                elapsed, cpu = await rollout_round(bench, tap, f"1.0.{n}", pids)
                baselines.append(base)
                rollouts.append(elapsed)
                cpus.append(cpu)
                print(f"round {n + 1}: baseline fan-out {base:.2f}s, rollout {elapsed:.2f}s, "
                      f"control plane CPU {cpu:.2f}s ({cpu / args.cells * 1000:.2f} ms per cell)",
                      flush=True)  # fmt: skip
        finally:
            rollout.terminate()
            await rollout.wait()
    base, elapsed, cpu = (statistics.median(x) for x in (baselines, rollouts, cpus))
    print(f"\n{args.cells} dedicated cells, zero soak, instant applier; median of {args.rounds}")
    print(f"{'baseline: one desired state to every cell, all reports back':62}{base:>7.2f}s")
    print(f"{'rollout: publish -> canary, 10%, 50%, 100% -> all updated':62}{elapsed:>7.2f}s"
          f"   target 10 s")  # fmt: skip
    per_cell = cpu / args.cells * 1000
    print(f"{'control plane CPU (rollout + registry) per cell updated':62}{per_cell:>6.2f}ms")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-db", type=int, default=14, help="an empty Redis database")
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
