"""A fleet simulator: N cells, each with its own broker user and connection
(created through the registry, so every message takes the real security path).

    python -m bench.fleet ingest [--cells 1000] [--heartbeats 100000] [--replicas 1]
    python -m bench.fleet storm [--cells 2000] [--processes N] [--services rollout flags]

`ingest` measures the registry's sustained rate of heartbeats applied to Redis next to raw
aio-pika consume+ack of the same stream, in the same run. `storm` measures how long N cells
connecting and registering at once take to all be `online`.

It runs its own registry process against a vhost and Redis database of its own, and removes
them (and every cell user it created) when it ends. The broker needs a socket limit above the
number of cells (RabbitMQ's default is about 830): see bench/RESULTS.md.

It watches the registry only from outside, as an operator can: its queues' depths on the
broker and the counters it serves on its metrics port (deliveries handled, registrations,
events published). A status request every moment of a round would load the process being
measured; a scrape of its counters costs it little.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import redis.asyncio as aioredis

from bench.baseline import raw_drain
from common.bus.errors import QueueMissing
from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE, CellRegistered
from common.rabbitmq_api import RabbitApi
from common.requests import Status
from common.requests.registry import CellsCreate, RegistryServiceStatus
from common.runner import run
from common.topology import Binding, Topology, consuming_queue
from testing.ports import free_port
from testing.processes import metric
from testing.simulator import CELLS_PER_PROCESS, SimCell, Simulators, gather_limited

AMQP_URL = os.environ.get("SUBSTRATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
API_URL = os.environ.get("SUBSTRATE_RABBITMQ_API_URL", "http://guest:guest@127.0.0.1:15672")
REDIS_URL = os.environ.get("SUBSTRATE_REDIS_URL", "redis://127.0.0.1:6379/0")
BIN = Path(sys.executable).parent
REGISTRY_CMD = os.environ.get("BENCH_REGISTRY_CMD", str(BIN / "substrate-registry")).split()
# Broker users removed per management API request (a batch of 1,000 was dropped unanswered).
USERS_PER_DELETE = 200


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


@dataclass
class Bench:
    """A vhost, a Redis database and a registry process of the benchmark's own."""

    vhost: str
    amqp_url: str
    redis_url: str
    api: RabbitApi
    control: RabbitBus
    workdir: Path
    registry: asyncio.subprocess.Process | None = None
    cells: list[SimCell] = field(default_factory=list)
    # Settings for the registry beside the benchmark's own; None unsets one (the registry's
    # default then holds).
    registry_env: dict[str, str | None] = field(default_factory=dict)
    # Where each registry replica serves its metrics.
    registry_metrics: list[int] = field(default_factory=list)
    # Registry replicas (competing consumers of registry.cells); ``registry`` is the first.
    replicas: int = 1
    others: list[asyncio.subprocess.Process] = field(default_factory=list)
    # Other services of the control plane the benchmark runs (rollout, flags), by name.
    services: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    @property
    def registry_pids(self) -> list[int]:
        return [p.pid for p in ([self.registry] if self.registry else []) + self.others]

    async def start_registry(self) -> None:
        env = {
            **os.environ,
            "SUBSTRATE_AMQP_URL": self.amqp_url,
            "SUBSTRATE_REDIS_URL": self.redis_url,
            "SUBSTRATE_RABBITMQ_API_URL": API_URL,
            # The benchmark measures ingest; nobody should go offline during it.
            "SUBSTRATE_OFFLINE_AFTER_SECONDS": "3600",
            "SUBSTRATE_LOG_LEVEL": "WARNING",
            # Each simulated cell beats far faster than an agent would: no per-cell limit.
            "SUBSTRATE_HEARTBEAT_LIMIT_PER_SECOND": "0",
        }
        for key, value in self.registry_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        log = (self.workdir / "registry.log").open("ab")
        # The first replica's port may be the caller's (registry_env); each other its own.
        first = int(env.get("SUBSTRATE_METRICS_PORT") or 0) or free_port()
        self.registry_metrics = [first, *(free_port() for _ in range(self.replicas - 1))]
        replicas = [
            await asyncio.create_subprocess_exec(
                *REGISTRY_CMD,
                env={**env, "SUBSTRATE_METRICS_PORT": str(port)},
                stdout=log,
                stderr=log,
            )
            for port in self.registry_metrics
        ]
        self.registry, self.others = replicas[0], replicas[1:]
        deadline = time.monotonic() + 30
        while not await self._registry_consuming():
            if time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start; see {self.workdir}/registry.log")
            await asyncio.sleep(0.05)

    async def registry_metric(self, name: str, **labels: str) -> float:
        """One of the registry's counters, summed over its replicas."""
        return sum([await metric(port, name, **labels) for port in self.registry_metrics])

    async def registry_handled(self, n: float) -> bool:
        """The registry has handled (and acknowledged) ``n`` deliveries of its cells' queue
        since it started."""
        handled = await self.registry_metric(
            "substrate_bus_consumed_messages_total", queue="registry.cells", outcome="acked"
        )
        return handled >= n

    async def _registry_consuming(self) -> bool:
        try:
            return (await self.control.queue_state("registry.cells")).consumers >= self.replicas
        except QueueMissing:
            return False  # the registry declares it at start

    async def start_service(self, name: str) -> asyncio.subprocess.Process:
        """Start ``substrate-<name>`` against the benchmark's vhost and Redis database; return
        once it answers a status request (it has declared its queues and consumes)."""
        env = {
            **os.environ,
            "SUBSTRATE_AMQP_URL": self.amqp_url,
            "SUBSTRATE_REDIS_URL": self.redis_url,
            "SUBSTRATE_RABBITMQ_API_URL": API_URL,
            "SUBSTRATE_LOG_LEVEL": "WARNING",
        }
        log = (self.workdir / f"{name}.log").open("ab")
        process = await asyncio.create_subprocess_exec(
            str(BIN / f"substrate-{name}"), env=env, stdout=log, stderr=log
        )
        self.services[name] = process

        async def answers() -> bool:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited; see {self.workdir}/{name}.log")
            try:
                await self.control.call(Status(), service=name, timeout=2)
                return True
            except Exception:
                return False

        await until(answers, 0.1)
        return process

    async def stop_services(self) -> None:
        for process in self.services.values():
            if process.returncode is None:
                process.terminate()
                await process.wait()
        self.services = {}

    async def stop_registry(self) -> None:
        for process in ([self.registry] if self.registry else []) + self.others:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await process.wait()
        self.registry, self.others = None, []

    async def create_cells(self, n: int, prefix: str) -> None:
        print(f"creating {n} cells through the registry ...", flush=True)
        started = time.perf_counter()

        async def create(i: int) -> SimCell:
            cell_id = f"{prefix}-{i:06d}"
            create = CellsCreate(id=cell_id, stage="dedicated", region="eu-west-1", org="bench")
            record = await self.control.call(create, timeout=60)
            return SimCell(cell_id, record.amqp_url)

        self.cells = await gather_limited(n, 24, create)
        print(f"  {n} cells created in {time.perf_counter() - started:.1f}s", flush=True)

    async def simulate(self, processes: int) -> Simulators:
        """The benchmark's cells in ``processes`` simulator workers (0: the default number)."""
        return await Simulators.start([(c.cell_id, c.url) for c in self.cells], processes,
                                      self.workdir)  # fmt: skip

    async def connect_cells(self, limit: int = 100) -> float:
        started = time.perf_counter()

        async def connect(i: int) -> None:
            await self.cells[i].connect()

        await gather_limited(len(self.cells), limit, connect)
        return time.perf_counter() - started

    async def online_count(self) -> int:
        answer = await self.control.call(Status(), service="registry", timeout=30)
        status = RegistryServiceStatus.model_validate(answer.model_dump())
        return status.cells.get("online", 0)

    async def cleanup(self) -> None:
        await self.stop_services()
        await self.stop_registry()
        for cell in self.cells:
            if cell.bus is not None:
                await cell.bus.close(drain_timeout=1)
        await self.control.close(drain_timeout=1)
        await self._delete_cell_users()
        await remove_vhost(self.api, self.amqp_url, self.vhost)
        redis = aioredis.from_url(self.redis_url)
        await redis.flushdb()
        await redis.aclose()

    async def _delete_cell_users(self) -> None:
        """Every user with permissions on the benchmark's vhost but its own: read from the
        broker, so the cells of an interrupted creation go too. In batches: one request a user
        took minutes for 10,000, a batch of 200 takes a tenth of a second."""
        ours = urlsplit(AMQP_URL).username or "guest"
        found = await self.api.call("GET", f"/vhosts/{quote(self.vhost, safe='')}/permissions")
        users = [p["user"] for p in found if p["user"] != ours]
        for i in range(0, len(users), USERS_PER_DELETE):
            await self.api.call(
                "POST", "/users/bulk-delete", {"users": users[i : i + USERS_PER_DELETE]}
            )
        print(f"  removed {len(users)} cell users", flush=True)


async def remove_vhost(api: RabbitApi, amqp_url: str, vhost: str) -> None:
    """Delete ``vhost``, its queues first. Deleted whole with thousands of queues in it, the
    vhost took the broker longer than its HTTP server waits (the request ends unanswered while
    the deletion goes on) and once left it unanswering for many minutes; its 10,000 queues
    deleted over AMQP, 32 at a time, took 71-96 s, and the empty vhost then seconds. Bounded;
    says what is left."""
    try:
        names = [q["name"] for q in await api.call(
            "GET", f"/queues/{quote(vhost, safe='')}?columns=name")]  # fmt: skip
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()

            async def delete(i: int) -> None:
                await channel.queue_delete(names[i])

            started = time.perf_counter()
            await gather_limited(len(names), 32, delete)
            print(f"  {len(names)} queues deleted in {time.perf_counter() - started:.1f}s",
                  flush=True)  # fmt: skip
        finally:
            await connection.close()
    except Exception as exc:
        print(f"  deleting the queues: {exc!r}", flush=True)
    try:
        await api.delete_vhost(vhost)
    except OSError as exc:
        print(f"  deleting the vhost: {exc!r}; waiting for it to be gone", flush=True)

    async def gone() -> bool:
        vhosts = await api.call("GET", "/vhosts?columns=name")
        return all(v["name"] != vhost for v in vhosts)

    try:
        async with asyncio.timeout(600):
            await until(gone, 1.0)
    except TimeoutError:
        print(f"  vhost {vhost} is still there: rabbitmqctl delete_vhost {vhost}", flush=True)


@asynccontextmanager
async def bench_environment(
    redis_db: int, registry_env: dict[str, str | None] | None = None, replicas: int = 1
) -> AsyncIterator[Bench]:
    # Deleting a vhost of 10,000 queues takes longer than the default 10 s.
    api = RabbitApi(API_URL, timeout=300)
    nodes = await api.call("GET", "/nodes")
    # Absent for a few seconds after the broker starts.
    sockets = min((int(n.get("sockets_total") or 0) for n in nodes), default=0) or "unknown"
    vhost = f"substrate-bench-{uuid.uuid4().hex[:6]}"
    await api.create_vhost(vhost)
    user = urlsplit(AMQP_URL).username or "guest"
    await api.set_permissions(vhost, user, configure=".*", write=".*", read=".*")
    amqp_url = _with_path(AMQP_URL, "/" + quote(vhost, safe=""))
    redis_url = _with_path(REDIS_URL, f"/{redis_db}")
    redis = aioredis.from_url(redis_url)
    if await redis.dbsize():
        await redis.aclose()
        await api.delete_vhost(vhost)
        raise SystemExit(f"Redis database {redis_db} is not empty; pick another with --redis-db")
    await redis.aclose()
    control = await RabbitBus.connect(amqp_url, name="bench-control")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / vhost
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(vhost, amqp_url, redis_url, api, control, workdir,
                  registry_env=registry_env or {}, replicas=replicas)  # fmt: skip
    print(f"broker socket limit {sockets}; vhost {vhost}; Redis db {redis_db}", flush=True)
    # A benchmark stopped with SIGTERM (or Ctrl-C) cleans up like one that finished.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await bench.start_registry()
        yield bench
    finally:
        await bench.cleanup()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def broker_and_redis_pids(bench: Bench) -> dict[str, list[int]]:
    """The broker's and Redis's processes where they run on this machine (empty where they do
    not, e.g. in a container: their CPU is then not counted)."""
    nodes = await bench.api.call("GET", "/nodes")
    redis = aioredis.from_url(bench.redis_url)
    info = await redis.info("server")
    await redis.aclose()
    brokers = [int(n["os_pid"]) for n in nodes if n.get("os_pid")]
    redis_pid = int(info["process_id"])
    return {
        "broker": [pid for pid in brokers if _runs_here(pid, "beam.smp")],
        "redis": [redis_pid] if _runs_here(redis_pid, "redis-server") else [],
    }


def _runs_here(pid: int, command: str) -> bool:
    """A process id another machine (or container) reported is this machine's ``command``."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == command
    except OSError:
        return False


@dataclass
class CpuMeter:
    """CPU seconds each part of the run spent on this machine between two readings: where a
    benchmark's time goes when every part shares the same cores."""

    parts: dict[str, list[int]]

    def read(self) -> dict[str, float]:
        return {part: sum(cpu_seconds(p) for p in pids) for part, pids in self.parts.items()}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {part: now - before[part] for part, now in self.read().items()}

    async def over(self, seconds: float) -> dict[str, float]:
        """What each part spends in the next ``seconds`` (the fleet at rest, say)."""
        before = self.read()
        await asyncio.sleep(seconds)
        return self.since(before)

    @staticmethod
    def line(spent: dict[str, float], elapsed: float) -> str:
        """E.g. ``broker 40.1s, simulators 52.0s, ... = 121.0s of 136.0s (2 cores)``."""
        cores = os.cpu_count() or 1
        parts = ", ".join(f"{part} {s:.1f}s" for part, s in spent.items())
        return f"{parts} = {sum(spent.values()):.1f}s of {elapsed * cores:.1f}s ({cores} cores)"


async def until(check: Callable[[], Awaitable[bool]], interval: float) -> None:
    """Poll state outside this process (the broker, Redis) until ``check`` holds."""
    while not await check():  # noqa: ASYNC110 - the state is in another process
        await asyncio.sleep(interval)


async def online_at_least(bench: Bench, n: int) -> bool:
    """The registry counts at least ``n`` cells online (asked with a status request)."""
    return await bench.online_count() >= n


async def queues_empty(bus: RabbitBus, *queues: str) -> bool:
    """No message waits in any of ``queues`` (delivered ones may still be in hand)."""
    for queue in queues:
        if (await bus.queue_state(queue)).messages:
            return False
    return True


async def ingest_round(
    bench: Bench, raw_queue: str, per_cell: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """Both queues receive the same heartbeats while nobody consumes them; then raw aio-pika
    drains its copy, and the registry (started afresh) drains its own."""
    await bench.stop_registry()
    total = per_cell * len(bench.cells)
    started = time.perf_counter()

    async def beat(i: int) -> None:
        for _ in range(per_cell):
            await bench.cells[i].heartbeat()

    await gather_limited(len(bench.cells), len(bench.cells), beat)
    publish_rate = total / (time.perf_counter() - started)
    print(f"  published {total:,} at {publish_rate:,.0f}/s from {len(bench.cells)} connections")

    raw_rate = await raw_drain(bench.amqp_url, raw_queue, total, args.prefetch)

    await bench.start_registry()
    pids = bench.registry_pids
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    started = time.perf_counter()
    await until(lambda: queues_empty(bench.control, "registry.cells"), 0.1)
    # The last deliveries (up to the prefetch) are still in flight: done when the registry (a
    # fresh process) has handled every heartbeat of the round.
    await until(lambda: bench.registry_handled(total), 0.01)
    elapsed = time.perf_counter() - started
    cpu = (sum(cpu_seconds(pid) for pid in pids) - cpu_before) / elapsed
    return raw_rate, total / elapsed, cpu


async def ingest(args: argparse.Namespace) -> None:
    async with bench_environment(args.redis_db, replicas=args.replicas) as bench:
        await bench.create_cells(args.cells, "hb")
        took = await bench.connect_cells()
        print(f"  {args.cells} cells connected in {took:.1f}s", flush=True)
        await gather_limited(args.cells, 200, lambda i: bench.cells[i].register())
        await until(lambda: online_at_least(bench, args.cells), 0.2)
        print(f"  {args.cells} cells online", flush=True)

        raw_queue = "bench.raw-heartbeats"
        await bench.control.declare(
            Topology((), consuming_queue(raw_queue, Binding(CELLS_EXCHANGE, "*.heartbeat")))
        )
        per_cell = max(1, args.heartbeats // args.cells)
        total = per_cell * args.cells
        raws, registries = [], []
        for r in range(args.rounds):
            raw_rate, registry_rate, cpu = await ingest_round(bench, raw_queue, per_cell, args)
            raws.append(raw_rate)
            registries.append(registry_rate)
            print(
                f"round {r + 1}: raw {raw_rate:,.0f}/s, registry {registry_rate:,.0f}/s "
                f"({registry_rate / raw_rate:.0%}; registry CPU {cpu:.0%} of a core)",
                flush=True,
            )
    raw_rate, registry_rate = statistics.median(raws), statistics.median(registries)
    ratio = registry_rate / raw_rate
    print(
        f"\n{total:,} heartbeats per round from {args.cells} cells, raw prefetch "
        f"{args.prefetch} (the registry's), median of {args.rounds} rounds"
    )
    print(f"{'raw aio-pika consume+ack':32}{raw_rate:>10,.0f}/s")
    label = f"registry x{args.replicas} (validate, Redis)"
    print(f"{label:32}{registry_rate:>10,.0f}/s{ratio:>8.0%}  target 80% (one replica)")
    print(f"fleet size at one heartbeat per 30 s: {registry_rate * 30:,.0f} cells (goal 100,000)")


async def storm(args: argparse.Namespace) -> None:
    """Baseline first: the same cells connect and publish their registration while the
    registry is stopped and raw aio-pika consumes a copy of the registrations; then they leave,
    the registry starts, and they arrive again, timed until the registry has every one online.
    With ``--services``, those services run through the storm as in a deployment, taking the
    registrations' events, and the storm is also timed until they have taken in every one."""
    async with bench_environment(args.redis_db) as bench:
        await bench.create_cells(args.cells, "st")
        sims = await bench.simulate(args.processes)
        processes = len(sims.processes)
        try:
            print(f"{args.cells} cells connecting and registering at once, from {processes} "
                  "processes ...", flush=True)  # fmt: skip
            shared = {
                **await broker_and_redis_pids(bench),
                "simulators": [p.pid for p in sims.processes],
            }
            # The raw consumer runs in this process: its CPU is the baseline's "bench".
            base_meter = CpuMeter({**shared, "bench": [os.getpid()]})
            baseline, base_spent = await storm_baseline(bench, sims, args.cells, base_meter)
            print(f"  baseline: every connection open and registration consumed by raw "
                  f"aio-pika after {baseline:.1f}s", flush=True)  # fmt: skip
            for name in args.services:
                await bench.start_service(name)
            await bench.start_registry()
            meter = CpuMeter({
                **shared,
                "registry": bench.registry_pids,
                **{name: [process.pid] for name, process in bench.services.items()},
            })  # fmt: skip
            before = meter.read()
            started = time.perf_counter()
            arrivals = asyncio.create_task(sims.command("arrive", "arrived"))
            await until(lambda: _all_registered(bench, args.cells), 0.1)
            all_online = time.perf_counter() - started
            registry_cpu = meter.since(before)["registry"]
            await arrivals
            arrived = time.perf_counter() - started
            queues = [f"{name}.events" for name in args.services]
            await until(lambda: events_taken_in(bench, queues), 0.2)
            taken_in = time.perf_counter() - started
            spent = meter.since(before)
        finally:
            await sims.stop()
        # Printed before the cleanup (deleting 10,000 broker users takes minutes).
        print(f"\n{args.cells} cells registering at once, from {processes} simulator processes")
        print(f"{'baseline: connect + publish, raw aio-pika consume':52}{baseline:>7.1f}s")
        print(f"{'registry: all online':52}{all_online:>7.1f}s   target 60 s (10,000 cells)")
        print(f"{'  (the simulators done connecting and publishing)':52}{arrived:>7.1f}s")
        if args.services:
            print(f"{'  (' + ' and '.join(args.services) + ' took in every event)':52}"
                  f"{taken_in:>7.1f}s")  # fmt: skip
        print(
            f"(registrations per second: {args.cells / all_online:,.0f}; registry CPU "
            f"{registry_cpu:.1f}s, {registry_cpu / args.cells * 1000:.2f} ms a registration)",
            flush=True,
        )
        print(f"CPU until then: {CpuMeter.line(spent, taken_in)}", flush=True)
        print(f"baseline's CPU: {CpuMeter.line(base_spent, baseline)}", flush=True)


async def events_taken_in(bench: Bench, queues: list[str]) -> bool:
    """The registry has published the registration of every cell and ``queues`` are empty."""
    published = await bench.registry_metric(
        "substrate_bus_published_messages_total",
        type=CellRegistered.wire_name,
        outcome="confirmed",
    )
    return published >= len(bench.cells) and await queues_empty(bench.control, *queues)


async def _all_registered(bench: Bench, n: int) -> bool:
    """Every cell registered (online) since the registry started."""
    done = await bench.registry_metric("substrate_registrations_total", outcome="registered")
    return done >= n


async def _connections_gone(bench: Bench) -> bool:
    vhost = quote(bench.vhost, safe="")
    found = await bench.api.call("GET", f"/vhosts/{vhost}/connections?columns=name")
    return len(found) <= 1  # the benchmark's own


async def storm_baseline(
    bench: Bench, sims: Simulators, n: int, meter: CpuMeter
) -> tuple[float, dict[str, float]]:
    """The baseline's time, and what each part spent in it."""
    await bench.stop_registry()
    raw_queue = "bench.raw-registrations"
    await bench.control.declare(
        Topology((), consuming_queue(raw_queue, Binding(CELLS_EXCHANGE, "*.register")))
    )
    before = meter.read()
    started = time.perf_counter()
    drained = asyncio.create_task(raw_drain(bench.amqp_url, raw_queue, n, 256))
    await sims.command("arrive", "arrived")
    await drained
    elapsed = time.perf_counter() - started
    spent = meter.since(before)
    await sims.command("leave", "left")
    # The broker closes 10,000 connections for a while after they left: the measured run
    # starts once it is done, as the baseline did.
    await until(lambda: _connections_gone(bench), 1.0)
    await bench.control.delete_queue(raw_queue)
    # The registry's queue kept its copy of the baseline's registrations: not part of the run.
    vhost = quote(bench.vhost, safe="")
    await bench.api.call("DELETE", f"/queues/{vhost}/registry.cells/contents")
    return elapsed, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-db", type=int, default=14, help="an empty Redis database")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="heartbeat ingest vs raw aio-pika")
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--heartbeats", type=int, default=100_000)
    p.add_argument("--prefetch", type=int, default=256, help="as the registry uses")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replicas", type=int, default=1, choices=range(1, 9),
                   help="registry replicas consuming at once")  # fmt: skip
    p.set_defaults(run=ingest)
    p = sub.add_parser("storm", help="N cells registering at once")
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help=f"simulator processes (default: one per {CELLS_PER_PROCESS} cells)",
    )
    p.add_argument(
        "--services",
        nargs="*",
        default=[],
        choices=("rollout", "flags"),
        help="services that run through the storm, taking the registrations' events",
    )
    p.set_defaults(run=storm)
    args = parser.parse_args()
    # The same event loop as the services, so the raw baseline and the registry compare fairly.
    run(args.run(args))


if __name__ == "__main__":
    main()
