"""The controller and the operator's views at 100,000 cells.

    python -m bench.scale [--cells 100000] [--redis-db 13]

No cell connects: the fleet is written through the services' own code, in this process, into a
Redis database of the benchmark's own (each cell created and registered through the registry's
store and transitions, and its registration applied to rollout's and flags' fleet views as
their event handlers apply it). Then:

1. the rollout controller, in this process: the time and memory of its full reload (its copy
   of the fleet), beside plain redis-py reading the same hash; the time of each step of a
   rollout to every cell (zero soak; each cell's success reported through rollout's store as
   its report would be), and of a step with nothing to do;
2. the services as processes (registry, rollout, flags) on a vhost of the benchmark's own: the
   rollout service's memory once it holds the fleet, and the operator's commands
   (`cells list`, one page and `--all`; `rollout status`; `flags preview`) timed as
   the operator runs them, beside `substratectl schema` (the command's own start, no service).

The database and vhost are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

import redis.asyncio as aioredis

from bench.fleet import AMQP_URL, API_URL, BIN, REDIS_URL, _with_path, until
from bench.rollout import release
from common.clock import SystemClock
from common.fleet import FleetView
from common.lease import Lease
from common.messages import CellRegister, CellRegistered, CellUpgrade, ReleasePublished
from common.rabbitmq_api import RabbitApi
from common.requests.registry import CellsCreate
from common.requests.rollout import RolloutPolicy
from common.runner import run
from services.flags.store import PREFIX as FLAGS_PREFIX
from services.registry import transitions
from services.registry.store import CELL as REGISTRY_CELL
from services.registry.store import CELLS as REGISTRY_CELLS
from services.registry.store import OUTBOX as REGISTRY_OUTBOX
from services.registry.store import RegistryStore
from services.rollout.controller import Controller
from services.rollout.model import CellFacts, new_rollout
from services.rollout.store import DIRTY, LEASE, RolloutStore
from services.rollout.store import PREFIX as ROLLOUT_PREFIX
from testing.simulator import gather_limited

T = TypeVar("T")
# An empty Redis database for the services' memory with no cell.
EMPTY_DB = 15
REGIONS = ("eu-west-1", "us-east-1", "ap-southeast-2")
FLAG = """key: bench-scale
owner: bench
variants: {on: true, off: false}
default_variant: off
rules:
  - when: [{attribute: stage, op: in, values: [staging, saas]}]
    serve: on
  - when: [{attribute: region, op: in, values: [eu-west-1]}]
    split: {on: 25, off: 75}
"""


def stage_of(i: int) -> str:
    return "staging" if i < 10 else "saas" if i == 10 else "dedicated"


async def populate(redis: aioredis.Redis, n: int) -> None:
    registry = RegistryStore(redis)
    views = [
        FleetView(redis, ROLLOUT_PREFIX, changed=DIRTY),
        FleetView(redis, FLAGS_PREFIX, with_targets=True),
    ]
    now = datetime.now(UTC)

    async def one(i: int) -> None:
        cell_id = f"sc-{i:06d}"
        stage, region, org = stage_of(i), REGIONS[i % 3], f"org-{i % 500}"
        create = CellsCreate.model_validate(
            {"id": cell_id, "stage": stage, "region": region, "org": org}
        )
        await registry.create(create, now, credential_id="bench")
        register = CellRegister(
            cell_id=cell_id, seq=1, sent_at=now, agent_version="1.0",
            aws_account_id="123456789012", region=region, incarnation="b",
        )  # fmt: skip
        await registry.transition(cell_id, lambda r: transitions.register(r, register, now))
        registered = CellRegistered(cell_id=cell_id, at=now, stage=stage, region=region, org=org,
                                    aws_account_id="123456789012", agent_version="1.0",
                                    installed_release="2026.1.0")  # fmt: skip
        for view in views:
            await view.apply(registered)

    started = time.perf_counter()
    done = 0

    async def counted(i: int) -> None:
        nonlocal done
        await one(i)
        done += 1
        if done % 20_000 == 0:
            print(f"  {done:,} cells written ({time.perf_counter() - started:.0f}s)", flush=True)

    await gather_limited(n, 64, counted)
    # Their events were applied above, as the services' handlers would have applied them.
    await redis.delete(REGISTRY_OUTBOX, DIRTY)
    print(f"  {n:,} cells created, registered and in both fleet views in "
          f"{time.perf_counter() - started:.0f}s", flush=True)  # fmt: skip


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


async def sliced(call: Callable[[], Awaitable[T]]) -> tuple[float, float, T]:
    """``call``'s wall time, and the longest the event loop went without running another task
    meanwhile (what an RPC or a consumer of the same process waited at worst)."""
    longest = 0.0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest = max(longest, now - last - 0.005)
            last = now

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0)
    try:
        took, result = await timed(call)
    finally:
        done.set()
        await prober
    return took, longest, result


async def reload_figures(redis: aioredis.Redis, store: RolloutStore) -> None:
    raw_times, load_times = [], []
    for _ in range(3):
        raw_time, raw = await timed(lambda: redis.hgetall(ROLLOUT_PREFIX + "fleet"))
        raw_times.append(raw_time)
        load_time, _ = await timed(store.table)
        load_times.append(load_time)
    raw_bytes = sum(len(k) + len(v) for k, v in raw.items())
    del raw
    tracemalloc.start()
    cells = await store.table()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\nthe controller's full reload of {len(cells):,} cells (median of 3)")
    raw_time, load_time = statistics.median(raw_times), statistics.median(load_times)
    print(f"{'baseline: redis-py HGETALL of the fleet hash':56}{raw_time:>7.2f}s"
          f"   ({raw_bytes / 1e6:.1f} MB of entries)")  # fmt: skip
    print(f"{'rollout store: every cell into the columns (CellTable)':56}{load_time:>7.2f}s"
          f"   copy held: {held / 1e6:.0f} MB ({held / len(cells):,.0f} bytes a cell; the "
          f"arrays {cells.nbytes() / len(cells):,.0f})")  # fmt: skip


async def controller_figures(redis: aioredis.Redis, store: RolloutStore, n: int) -> str:
    """A rollout to every cell, stepped by hand; each cell's success reported through the
    store. Returns the version."""
    await store.set_policy(RolloutPolicy.model_validate(
        {"soak_seconds": {"staging": 0, "saas": 0, "dedicated": 0}}))  # fmt: skip
    clock = SystemClock()
    controller = Controller(store, clock, Lease(redis, LEASE, 30))
    first, _ = await timed(controller.tick)
    idle = [(await timed(controller.tick))[0] for _ in range(5)]
    some_cell = str(await redis.hrandfield(ROLLOUT_PREFIX + "fleet"))

    async def one_changed() -> bool:
        await redis.sadd(DIRTY, some_cell)  # as a fact about it does
        return await controller.tick()

    looked = [(await timed(one_changed))[0] for _ in range(5)]
    print(f"\ncontroller steps at {n:,} cells")
    print(f"{'first step (takes the lease, loads the fleet)':56}{first:>7.2f}s")
    print(f"{'a step, nothing to do, fleet unchanged (median of 5)':56}"
          f"{statistics.median(idle):>7.2f}s")  # fmt: skip
    print(f"{'a step, nothing to do, one cell changed (median of 5)':56}"
          f"{statistics.median(looked):>7.2f}s")  # fmt: skip

    rel = release("2026.2.0")
    now = clock.now()
    await store.publish(rel, at=now, by="bench", event=ReleasePublished(at=now, release=rel),
                        rollout=new_rollout(rel, now))  # fmt: skip
    steps: list[tuple[float, float, int]] = []
    reported: set[str] = set()
    seq = 1
    while True:
        took, longest, _ = await sliced(controller.tick)
        sent = [c for c in await store.cells()
                if c.desired_version == rel.version and c.id not in reported]  # fmt: skip
        steps.append((took, longest, len(sent)))
        rollout = await store.rollout(rel.version)
        assert rollout is not None
        if rollout.state == "completed":
            break
        if rollout.state not in ("in_progress", "soaking"):
            raise SystemExit(f"the rollout is {rollout.state}: {rollout}")
        seq += 1

        async def succeed(i: int, seq: int = seq, sent: list[CellFacts] = sent) -> None:
            cell = sent[i]
            assert cell.desired_generation is not None
            msg = CellUpgrade(cell_id=cell.id, seq=seq, sent_at=clock.now(),
                              generation=cell.desired_generation, release_version=rel.version,
                              phase="succeeded")  # fmt: skip
            await store.upgrade(msg, clock.now())

        await gather_limited(len(sent), 64, succeed)
        reported.update(c.id for c in sent)
    await controller.lease.release()
    assigning = [(t, slice_, k) for t, slice_, k in steps if k]
    print(f"rollout of {rel.version} to every cell: {len(steps)} steps, "
          f"{len(assigning)} of them sending desired states "
          "(the event loop's longest slice in each, in brackets)")  # fmt: skip
    for t, slice_, k in assigning:
        print(f"  step sending {k:>7,} desired states{t:>27.2f}s  ({t / k * 1000:.3f} ms a cell)"
              f"  [{slice_:.2f}s]")  # fmt: skip
    others = [(t, slice_) for t, slice_, k in steps if not k]
    if others:
        print(f"  steps sending nothing: max {max(t for t, _ in others):.2f}s  "
              f"[{max(s for _, s in others):.2f}s]")  # fmt: skip
    outbox = await redis.llen(ROLLOUT_PREFIX + "outbox")
    print(f"  ({outbox:,} commands and events waiting in rollout's outbox: no broker here)")
    await redis.delete(ROLLOUT_PREFIX + "outbox")
    return rel.version


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident memory now and at its peak, from /proc."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


class CommandFailed(Exception):
    pass


async def ctl(env: dict[str, str], *args: str) -> tuple[float, int]:
    """Run ``substratectl --json ARGS`` as the operator does: its wall time and output bytes."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        str(BIN / "substratectl"), "--json", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    took = time.perf_counter() - started
    if process.returncode != 0:
        raise CommandFailed(f"substratectl {' '.join(args)}: {err.decode().strip()}")
    return took, len(out)


async def read_records(redis_url: str) -> float:
    """What ``cells list --all`` reads, read with plain redis-py: every record, by id (median
    of 3)."""
    redis = aioredis.from_url(redis_url, decode_responses=True)
    try:
        ids = sorted(str(i) for i in await redis.smembers(REGISTRY_CELLS))
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for i in range(0, len(ids), 5000):
                pipe = redis.pipeline(transaction=False)
                for cell_id in ids[i : i + 5000]:
                    pipe.hgetall(REGISTRY_CELL + cell_id)
                await pipe.execute()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)
    finally:
        await redis.aclose()


async def empty_services(env: dict[str, str], log: IO[bytes]) -> dict[str, float]:
    """Each service's resident memory with no cell (an empty Redis database): what a service
    holds for a fleet is what it holds beyond this."""
    empty_url = _with_path(REDIS_URL, f"/{EMPTY_DB}")
    redis = aioredis.from_url(empty_url)
    if await redis.dbsize():
        raise SystemExit(f"Redis database {EMPTY_DB} is not empty")
    procs = {
        service: await asyncio.create_subprocess_exec(
            str(BIN / f"substrate-{service}"),
            env={**env, "SUBSTRATE_REDIS_URL": empty_url}, stdout=log, stderr=log,
        )
        for service in ("registry", "rollout", "flags")
    }  # fmt: skip
    try:
        await until(lambda: answering({**env, "SUBSTRATE_REDIS_URL": empty_url}), 0.5)
        await asyncio.sleep(3)  # a few controller steps
        return {service: memory_mb(process.pid)[0] for service, process in procs.items()}
    finally:
        for process in procs.values():
            process.terminate()
        for process in procs.values():
            await process.wait()
        await redis.flushdb()
        await redis.aclose()


async def answering(env: dict[str, str]) -> bool:
    try:
        for args in (("cells", "list", "--limit", "1"), ("rollout", "list"), ("flags", "list")):
            await ctl(env, *args)
        return True
    except CommandFailed as exc:
        if "no operator" in str(exc):
            raise  # waiting would never end
        return False


async def views(env: dict[str, str], workdir: Path, version: str, n: int) -> None:
    procs: dict[str, asyncio.subprocess.Process] = {}
    log = (workdir / "services.log").open("ab")
    empty = await empty_services(env, log)
    try:
        for service in ("registry", "rollout", "flags"):
            procs[service] = await asyncio.create_subprocess_exec(
                str(BIN / f"substrate-{service}"), env=env, stdout=log, stderr=log
            )

        await until(lambda: answering(env), 0.5)
        records = await read_records(env["SUBSTRATE_REDIS_URL"])
        print(f"\nbaseline: redis-py reading every cell's record (HGETALL pipelined, 5,000 a "
              f"round trip): {records:.2f}s")  # fmt: skip
        flag_file = workdir / "flag.yaml"
        flag_file.write_text(FLAG)
        commands = [
            ("substratectl schema (baseline: no service)", ("schema",)),
            ("cells list (one page of 1,000)", ("cells", "list")),
            (f"cells list --all ({n:,} cells)", ("cells", "list", "--all")),
            (f"rollout status {version}", ("rollout", "status", version)),
            ("flags preview (a rule and a split)", ("flags", "preview", str(flag_file))),
        ]
        print(f"\nthe operator's commands at {n:,} cells (substratectl --json, median of 3)")
        for label, args in commands:
            runs = [await ctl(env, *args) for _ in range(3)]
            took = statistics.median(t for t, _ in runs)
            print(f"{label:56}{took:>7.2f}s   {runs[0][1] / 1e6:>6.1f} MB of JSON")
        print("\nresident memory after these (peak), and beyond the same service's with no "
              "cell, a cell:")  # fmt: skip
        for service, process in procs.items():
            now, peak = memory_mb(process.pid)
            beyond = (now - empty[service]) * 1024 * 1024 / n
            print(f"  {service:10}{now:>6.0f} MB ({peak:.0f} MB)   {empty[service]:.0f} MB with "
                  f"no cell: {beyond:,.0f} bytes a cell")  # fmt: skip
    finally:
        for process in procs.values():
            process.terminate()
        for process in procs.values():
            await process.wait()


async def main(args: argparse.Namespace) -> None:
    redis_url = _with_path(REDIS_URL, f"/{args.redis_db}")
    redis = aioredis.from_url(redis_url, decode_responses=True)
    if await redis.dbsize():
        raise SystemExit(f"Redis database {args.redis_db} is not empty; pick another")
    api = RabbitApi(API_URL, timeout=300)
    vhost = f"substrate-scale-{uuid.uuid4().hex[:6]}"
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / vhost
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing {args.cells:,} cells into Redis database {args.redis_db} ...", flush=True)
        await populate(redis, args.cells)
        store = RolloutStore(redis)
        await reload_figures(redis, store)
        version = await controller_figures(redis, store, args.cells)
        await api.create_vhost(vhost)
        user = "guest"
        await api.set_permissions(vhost, user, configure=".*", write=".*", read=".*")
        env = {
            **os.environ,
            "SUBSTRATE_AMQP_URL": _with_path(AMQP_URL, "/" + quote(vhost, safe="")),
            "SUBSTRATE_REDIS_URL": redis_url,
            "SUBSTRATE_RABBITMQ_API_URL": API_URL,
            "SUBSTRATE_LOG_LEVEL": "WARNING",
            # The broker user the benchmark runs substratectl as is an admin, as make dev's is.
            "SUBSTRATE_ADMINS": "guest",
            # No cell heartbeats here: none may go offline during the benchmark.
            "SUBSTRATE_OFFLINE_AFTER_SECONDS": "86400",
            "SUBSTRATE_RPC_TIMEOUT_SECONDS": "120",
        }
        await views(env, workdir, version, args.cells)
    finally:
        await redis.flushdb()
        await redis.aclose()
        try:
            await api.delete_vhost(vhost)
        except Exception as exc:
            print(f"(vhost {vhost}: {exc})", file=sys.stderr)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-db", type=int, default=13, help="an empty Redis database")
    parser.add_argument("--cells", type=int, default=100_000)
    args: Any = parser.parse_args()
    run(main(args))


if __name__ == "__main__":
    cli()
