"""Soak: a simulated fleet taking a release every minute while faults land at random.

    python -m bench.soak [--cells 500] [--minutes 10] [--heartbeat 5] [--release-every 60]
                         [--fault-every 40] [--seed 1]

It runs on a RabbitMQ node and a Redis (AOF, fsync always) of its own (testing/nodes.py),
so it may kill and restart them; the registry and the rollout service run as processes it
restarts when it kills them. The cells are simulated in this process, each with its own broker
user and connection (made through the registry), acting as an agent does: it journals a desired
state and acks it, reports succeeded (an instant upgrade's phases on the way end before they
are worth reporting), applies a release at most once per generation, heartbeats every few
seconds, and after a reconnect registers and syncs. Faults, one every ``--fault-every`` seconds
(with jitter), at random:

- the broker killed (-9) and restarted, or restarted gracefully;
- the registry or the rollout service killed (-9) and started again;
- five cells killed: their connections dropped at once (unacked deliveries go back to their
  queues), their journals kept, and started again a few seconds later.

Every 30 s it prints the ledger so far, the broker's memory and the heartbeat lag (how old the
registry's newest heartbeat of each online cell is, on the registry's clock, as `cells list`
shows it). At the end it
stops the faults, waits for every cell to be on the last release, and prints the ledger:
lost (a cell not on the last release), applied twice (a generation, or a release already
installed, applied again) and how many desired states came for a release the cell already ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import signal
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench.fleet import BIN
from bench.rollout import publish
from common.bus.rabbit_bus import RabbitBus
from common.messages import (
    CellHeartbeat,
    CellSync,
    CellUpgrade,
    Delivery,
    DesiredState,
    command_queue,
)
from common.rabbitmq_api import RabbitApi
from common.requests import Request
from common.requests.registry import CellsCreate, CellsList
from common.requests.rollout import PolicySet, RolloutExplain, RolloutPolicy, SoakTimes
from common.routes import route
from common.runner import run
from common.vocabulary import Stage
from testing.nodes import PrivateRabbit, PrivateRedis
from testing.simulator import SimCell, gather_limited

SAMPLE_SECONDS = 30

R = TypeVar("R")


@dataclass
class Ledger:
    """What the simulated cells applied, counted by (cell, release) and (cell, generation)."""

    by_release: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_generation: Counter[tuple[str, int]] = field(default_factory=Counter)
    redundant: int = 0

    @property
    def twice(self) -> int:
        return sum(1 for n in (*self.by_release.values(), *self.by_generation.values()) if n > 1)


@dataclass
class SoakCell:
    """A simulated agent: its journal (generation, release, installed) survives its 'death'."""

    sim: SimCell
    ledger: Ledger
    generation: int = 0
    desired: str | None = None
    installed: str | None = None
    pending: list[CellUpgrade] = field(default_factory=list)
    work: asyncio.Event = field(default_factory=asyncio.Event)
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)
    where: str = "new"

    @property
    def id(self) -> str:
        return self.sim.cell_id

    async def start(self) -> None:
        await self.sim.connect()
        bus = self.sim.bus
        assert bus is not None
        bus.on_reconnect(self.after_reconnect)
        await bus.consume(command_queue(self.id), [route(DesiredState, self.on_desired_state)])
        await self.after_reconnect()

    async def after_reconnect(self) -> None:
        await _quietly(self.sim.register())
        await self.flush()
        await _quietly(self.sync())
        self.work.set()

    async def kill(self) -> None:
        """As kill -9: the connection goes at once; what was unacked is redelivered."""
        if self.sim.bus is not None:
            await self.sim.bus.close(drain_timeout=0)
            self.sim.bus = None

    async def sync(self) -> None:
        assert self.sim.bus is not None
        await self.sim.bus.publish(CellSync(cell_id=self.id, seq=self.sim.next_seq(),
                                            sent_at=datetime.now(UTC), reason="reconnect",
                                            applied_generation=self.generation))  # fmt: skip

    async def on_desired_state(self, msg: DesiredState, delivery: Delivery) -> None:
        # Journaled and acked at once; the work happens in upgrade(), as in the agent.
        if msg.generation <= self.generation:
            return
        self.generation = msg.generation
        self.desired = msg.release.version if msg.release else None
        self.work.set()

    async def upgrade(self, stop: asyncio.Event) -> None:
        done = 0
        while not stop.is_set():
            self.where = "waiting"
            await self.work.wait()
            self.work.clear()
            generation, version = self.generation, self.desired
            self.where = f"woke for {generation}, done {done}, bus {self.sim.bus is not None}"
            if generation == done or self.sim.bus is None:
                continue
            if version == self.installed:
                self.ledger.redundant += 1
            else:
                self.ledger.by_release[(self.id, str(version))] += 1
                self.installed = version
            self.ledger.by_generation[(self.id, generation)] += 1
            done = generation
            # The outcome alone, as an agent reports an upgrade that takes a moment.
            self.pending.append(CellUpgrade(
                cell_id=self.id, seq=self.sim.next_seq(), sent_at=datetime.now(UTC),
                generation=generation, release_version=version, phase="succeeded",
            ))  # fmt: skip
            self.where = f"flushing the outcome of {generation}"
            await self.flush()

    async def flush(self) -> None:
        """Send the kept reports in order; what fails stays for the next try. One sender at a
        time (the heartbeat, the upgrade and a reconnect all flush), as in the agent."""
        async with self.sending:
            while self.pending and self.sim.bus is not None:
                try:
                    await self.sim.bus.publish(self.pending[0])
                except Exception:
                    return
                self.pending.pop(0)

    async def beat(self, every: float, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, every))
        while not stop.is_set():
            if self.sim.bus is not None:
                await self.flush()
                await _quietly(self._heartbeat())
            await asyncio.sleep(every)

    async def _heartbeat(self) -> None:
        assert self.sim.bus is not None
        await self.sim.bus.publish(CellHeartbeat(
            cell_id=self.id, seq=self.sim.next_seq(), sent_at=datetime.now(UTC),
            agent_version="soak", installed_release=self.installed,
            applied_generation=self.generation or None,
        ))  # fmt: skip


async def _quietly(work: Any) -> None:
    try:
        await work
    except Exception:
        return


@dataclass
class Service:
    name: str
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                str(BIN / f"substrate-{self.name}"), env=self.env, stdout=sink, stderr=sink
            )

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


@dataclass
class Soak:
    args: argparse.Namespace
    rabbit: PrivateRabbit
    redis_node: PrivateRedis
    services: dict[str, Service]
    control: RabbitBus
    cells: list[SoakCell] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    versions: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    lags: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {text}", flush=True)

    async def call(self, request: Request[R]) -> R:
        """A request, sent again while the broker or the service is away."""
        for _ in range(120):
            try:
                return await self.control.call(request, timeout=5)
            except Exception:
                await asyncio.sleep(1)
        raise RuntimeError(f"{request.service} {request.method} got no answer for minutes")

    async def publish_release(self) -> None:
        version = f"1.0.{len(self.versions) + 1}"
        await self.call(publish(version))
        self.versions.append(version)
        self.log(f"release {version} published")

    async def start_fleet(self) -> None:
        """A short-soak policy, then the cells: two staging, one saas, the rest dedicated."""
        soaks = SoakTimes(staging=5, saas=5, dedicated=5)
        policy = RolloutPolicy(soak_seconds=soaks, progress_deadline_seconds=600)
        await self.call(PolicySet(policy=policy))
        n = self.args.cells
        first: list[Stage] = ["staging", "staging", "saas"]
        stages = first + ["dedicated"] * (n - 3)

        async def create(i: int) -> SoakCell:
            cell_id = f"soak-{i:05d}"
            create = CellsCreate(id=cell_id, stage=stages[i], region="eu-west-1", org="soak")
            record = await self.call(create)
            return SoakCell(SimCell(cell_id, record.amqp_url), self.ledger)

        self.cells = await gather_limited(n, 24, create)
        await gather_limited(n, 50, lambda i: self.cells[i].start())
        self.log(f"{n} cells connected and registered")

    async def settle(self) -> None:
        """After the last fault: wait for every cell to be on the last release; the ledger."""
        args, last = self.args, self.versions[-1]
        self.log(f"faults stopped; waiting for every cell to be on {last}")
        deadline = time.monotonic() + args.settle
        # The cells are polled: they change state in many tasks, none of which knows the rest.
        while time.monotonic() < deadline and any(c.installed != last for c in self.cells):  # noqa: ASYNC110
            await asyncio.sleep(1)
        await self.sample()
        lost = [c for c in self.cells if c.installed != last]
        for cell in lost[:10]:
            why = await self.call(RolloutExplain(id=cell.id))
            self.log(f"lost {cell.id}: installed {cell.installed}, journal generation "
                     f"{cell.generation} ({cell.desired}), connected {cell.sim.bus is not None}, "
                     f"{len(cell.pending)} reports kept, {cell.where}; "
                     f"rollout says: {why.explanation}")  # fmt: skip
        print(f"\n{args.cells} cells, {args.minutes:g} min, heartbeat every {args.heartbeat:g}s, "
              f"a release every {args.release_every:g}s, "
              f"a fault every ~{args.fault_every:g}s")  # fmt: skip
        print(f"faults injected: {dict(self.faults)}")
        print(f"releases published: {len(self.versions)}; applications: "
              f"{sum(self.ledger.by_release.values())}")  # fmt: skip
        print(f"lost (cells not on {last} {args.settle:g}s after the last fault): {len(lost)}")
        print(f"applied twice: {self.ledger.twice}; desired states for a release already run: "
              f"{self.ledger.redundant}")  # fmt: skip
        if self.lags:
            print(f"heartbeat age, max per {SAMPLE_SECONDS} s sample: median "
                  f"{statistics.median(self.lags):.1f}s, worst {max(self.lags):.1f}s "
                  f"(a heartbeat every {args.heartbeat:g}s)")  # fmt: skip

    async def fault(self) -> None:
        kind = random.choice(("broker-kill", "broker-restart", "registry", "rollout", "cells"))
        self.faults[kind] += 1
        self.log(f"fault: {kind}")
        if kind == "broker-kill":
            await self.rabbit.kill()
            await self.rabbit.start()
        elif kind == "broker-restart":
            await self.rabbit.restart(graceful=True)
        elif kind in ("registry", "rollout"):
            await self.services[kind].kill()
            await asyncio.sleep(random.uniform(0, 3))
            await self.services[kind].start()
        else:
            victims = random.sample(self.cells, 5)
            for cell in victims:
                await cell.kill()
            await asyncio.sleep(random.uniform(2, 8))
            for cell in victims:
                await _quietly(cell.start())

    async def heartbeat_lag(self) -> tuple[float, float]:
        """(p99, max) age of the online cells' last heartbeats, on the registry's clock, as
        ``cells list`` shows them."""
        online = await self.call(CellsList(status="online"))
        beats = [c.last_heartbeat_at for c in online if c.last_heartbeat_at is not None]
        if not beats:
            return 0.0, 0.0
        now = datetime.now(UTC)
        ages = sorted((now - beat).total_seconds() for beat in beats)
        return ages[int(0.99 * (len(ages) - 1))], ages[-1]

    async def sample(self) -> None:
        try:
            p99, worst = await self.heartbeat_lag()
            self.lags.append(worst)
            nodes = await RabbitApi(self.rabbit.api_url).call("GET", "/nodes")
            memory = sum(int(n.get("mem_used") or 0) for n in nodes) / 2**20
        except Exception as exc:
            self.log(f"sample skipped ({type(exc).__name__}: the broker or Redis is away)")
            return
        latest = self.versions[-1] if self.versions else None
        on_latest = sum(1 for c in self.cells if c.installed == latest)
        self.log(
            f"ledger: {sum(self.ledger.by_release.values())} applied, {self.ledger.twice} twice, "
            f"{self.ledger.redundant} redundant; {on_latest}/{len(self.cells)} on {latest}; "
            f"heartbeat age p99 {p99:.1f}s max {worst:.1f}s; broker memory {memory:.0f} MiB"
        )


async def _every(seconds: float, jitter: float, work: Any, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), seconds + random.uniform(-jitter, jitter))
        except TimeoutError:
            await work()


async def soak(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    # A socket per simulated cell.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="substrate-soak-"))
    rabbit, redis_node = PrivateRabbit(root / "rabbit"), PrivateRedis(root / "redis")
    (root / "rabbit").mkdir()
    (root / "redis").mkdir()
    await rabbit.start()
    await redis_node.start()
    env = {
        **os.environ,
        "SUBSTRATE_AMQP_URL": rabbit.amqp_url,
        "SUBSTRATE_REDIS_URL": redis_node.url,
        "SUBSTRATE_RABBITMQ_API_URL": rabbit.api_url,
        "SUBSTRATE_LOG_LEVEL": "WARNING",
        "SUBSTRATE_OFFLINE_AFTER_SECONDS": str(6 * args.heartbeat),
    }
    services = {n: Service(n, env, root / f"{n}.log") for n in ("registry", "rollout")}
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        for service in services.values():
            await service.start()
        control = await RabbitBus.connect(rabbit.amqp_url, name="soak-control")
        s = Soak(args, rabbit, redis_node, services, control)
        await s.start_fleet()
        for cell in s.cells:
            tasks += [asyncio.create_task(cell.upgrade(stop)),
                      asyncio.create_task(cell.beat(args.heartbeat, stop))]  # fmt: skip
        s.started = time.monotonic()
        await s.publish_release()
        faulting = asyncio.Event()
        loops = [
            asyncio.create_task(_every(args.release_every, 0, s.publish_release, faulting)),
            asyncio.create_task(_every(args.fault_every, args.fault_every / 4, s.fault, faulting)),
        ]
        tasks.append(asyncio.create_task(_every(SAMPLE_SECONDS, 0, s.sample, stop)))
        await asyncio.sleep(args.minutes * 60)
        faulting.set()
        await asyncio.gather(*loops)
        await s.settle()
        for cell in s.cells:
            await cell.kill()
        await control.close(drain_timeout=1)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in services.values():
            await service.kill()
        await rabbit.kill()
        await redis_node.kill()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--heartbeat", type=float, default=5)
    parser.add_argument("--release-every", type=float, default=60)
    parser.add_argument("--fault-every", type=float, default=40)
    parser.add_argument("--settle", type=float, default=300,
                        help="seconds the fleet may take to converge after the faults")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    run(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
