"""Simulated cells spread over several processes: one Python process opens about 2,000 AMQP
connections in reasonable time, so 10,000 cells take several.

A worker (``python -m testing.simulator FILE``) holds the cells listed in FILE (one
``{"cell_id": ..., "url": ...}`` per line) and obeys one command per line on stdin, answering
each on stdout once every one of its cells has done it:

- ``arrive``: each cell connects and registers (retrying while the broker turns it away), as an
  agent does when it starts: ``arrived``;
- ``connect``: each cell connects: ``connected``;
- ``answer``: each cell consumes its command queue and answers a desired state as an agent with
  an instant applier does (its outcome, ``succeeded``, alone): ``answering``; from then on
  the worker prints ``updated VERSION`` once all its cells have reported `succeeded` for it;
- ``register``: each cell registers: ``registered``;
- ``leave``: each cell closes its connection: ``left``;
- ``beat``: from now on every cell heartbeats every HEARTBEAT_SECONDS: ``beating``;
- ``ledger``: ``ledger {cell: {release: [generations applied]}}``;
- ``forget``: the cells forget the generations they applied (a baseline round's generations
  start again at 1): ``forgot``.

``Simulators`` in the benchmark's process starts the workers and speaks this protocol.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from common.bus.errors import BusError
from common.bus.rabbit_bus import RabbitBus
from common.messages import CellHeartbeat, CellRegister, CellUpgrade, DesiredState, command_queue
from common.routes import route
from common.runner import run

# One Python process opens about this many AMQP connections in reasonable time.
CELLS_PER_PROCESS = 2000
# Connections a worker opens at once: more only queues them in the broker's accept loop.
CONNECT_CONCURRENCY = 50
# With ``beat``: often enough that no cell goes offline under a registry's short test settings.
HEARTBEAT_SECONDS = 5.0


async def gather_limited(n: int, limit: int, one: Callable[[int], Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def run_one(i: int) -> Any:
        async with gate:
            return await one(i)

    return list(await asyncio.gather(*(run_one(i) for i in range(n))))


@dataclass
class SimCell:
    cell_id: str
    url: str
    bus: RabbitBus | None = None
    seq: int = 0
    applied: int = 0
    installed: str | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def connect(self) -> None:
        self.bus = await RabbitBus.connect(
            self.url, name=f"sim:{self.cell_id}", namespace="cell_agent", give_up_after=120
        )

    async def register(self) -> None:
        assert self.bus is not None
        await self.bus.publish(
            CellRegister(
                cell_id=self.cell_id,
                seq=self.next_seq(),
                sent_at=datetime.now(UTC),
                agent_version="sim",
                aws_account_id="123456789012",
                region="eu-west-1",
                incarnation="sim",
                # As the agent says: it looks for its queue itself. (The agent's look, a
                # passive declare after registering, is not simulated.)
                queue_missing=False,
            )
        )

    async def heartbeat(self) -> None:
        assert self.bus is not None
        await self.bus.publish(
            CellHeartbeat(
                cell_id=self.cell_id,
                seq=self.next_seq(),
                sent_at=datetime.now(UTC),
                agent_version="sim",
                installed_release=self.installed,
                applied_generation=self.applied or None,
            )
        )

    async def register_until_taken(self) -> None:
        await self.until_taken(self.register)

    @staticmethod
    async def until_taken(publish: Callable[[], Awaitable[None]]) -> None:
        """As an agent's outbox does: a report the broker did not confirm (turned away, or its
        node lost mid-publish) is sent again."""
        while True:
            try:
                await publish()
                return
            except BusError:
                await asyncio.sleep(0.5)


@dataclass
class Worker:
    cells: list[SimCell]
    updated: Counter[str] = field(default_factory=Counter)
    # cell -> release -> the generations of it the cell applied (a ledger: two is a release
    # applied twice).
    applications: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    beating: asyncio.Task[None] | None = None

    async def on_desired_state(self, cell: SimCell, msg: DesiredState) -> None:
        if msg.generation <= cell.applied:
            return  # a redelivery, or older than what the cell applied: not applied again
        cell.applied = msg.generation
        version = msg.release.version if msg.release else None
        if version is not None:
            applied = self.applications.setdefault(cell.cell_id, {})
            applied.setdefault(version, []).append(msg.generation)
        assert cell.bus is not None
        bus = cell.bus
        # The outcome alone, as an agent reports an upgrade that takes a moment (its phases on
        # the way last less than CELL_PROGRESS_REPORT_SECONDS); with health checks and a bake of
        # no length, with its verdict (healthy: the checks pass), as the agent sends them.
        judged = msg.health is not None and msg.health.bake_seconds == 0
        report = CellUpgrade(
            cell_id=cell.cell_id,
            seq=cell.next_seq(),
            sent_at=datetime.now(UTC),
            generation=msg.generation,
            release_version=version,
            phase="succeeded",
            verdict="healthy" if judged else None,
            installed_release=version,
        )
        await SimCell.until_taken(partial(bus.publish, report))
        cell.installed = version
        if version is not None:
            self.updated[version] += 1
            if self.updated[version] == len(self.cells):
                say(f"updated {version}")

    async def beat(self) -> None:
        """Every cell heartbeats every HEARTBEAT_SECONDS (a beat the broker turns away is
        skipped, as the next one says the same)."""
        while True:
            started = asyncio.get_running_loop().time()
            for cell in self.cells:
                if cell.bus is not None:
                    with suppress(BusError):
                        await cell.heartbeat()
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, HEARTBEAT_SECONDS - elapsed))

    async def answer(self, cell: SimCell) -> None:
        async def handler(msg: DesiredState, delivery: object) -> None:
            await self.on_desired_state(cell, msg)

        assert cell.bus is not None
        await cell.bus.consume(command_queue(cell.cell_id), [route(DesiredState, handler)])

    async def each(self, one: Callable[[SimCell], Awaitable[None]], limit: int = 200) -> None:
        await gather_limited(len(self.cells), limit, lambda i: one(self.cells[i]))

    async def obey(self, command: str) -> str:
        if command == "arrive":

            async def arrive(cell: SimCell) -> None:
                await cell.connect()
                await cell.register_until_taken()

            await self.each(arrive, CONNECT_CONCURRENCY)
            return "arrived"
        if command == "connect":
            await self.each(SimCell.connect, CONNECT_CONCURRENCY)
            return "connected"
        if command == "answer":
            await self.each(self.answer)
            return "answering"
        if command == "register":
            await self.each(SimCell.register_until_taken)
            return "registered"
        if command == "leave":

            async def leave(cell: SimCell) -> None:
                if cell.bus is not None:
                    await cell.bus.close(drain_timeout=1)
                    cell.bus = None

            await self.each(leave)
            return "left"
        if command == "beat":
            self.beating = asyncio.create_task(self.beat())
            return "beating"
        if command == "ledger":
            return "ledger " + json.dumps(self.applications, separators=(",", ":"))
        if command == "forget":
            for cell in self.cells:
                cell.applied = 0
            self.updated.clear()
            return "forgot"
        raise SystemExit(f"unknown command {command!r}")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(cells: list[SimCell]) -> None:
    worker = Worker(cells)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    say("ready")
    try:
        while line := (await reader.readline()).decode().strip():
            say(await worker.obey(line))
    finally:
        await asyncio.gather(
            *(c.bus.close(drain_timeout=1) for c in cells if c.bus is not None),
            return_exceptions=True,
        )


@dataclass
class Simulators:
    """Worker processes holding ``cells`` between them (the benchmark's side of the protocol)."""

    processes: list[asyncio.subprocess.Process]
    replies: list[asyncio.Queue[str]]
    updated: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, cells: list[tuple[str, str]], n: int, workdir: Path) -> Simulators:
        """``n`` workers (0: one per CELLS_PER_PROCESS cells) for ``cells`` (id, URL)."""
        n = max(1, min(n or -(-len(cells) // CELLS_PER_PROCESS), len(cells)))
        processes = []
        for w in range(n):
            path = workdir / f"simulator-{w}.jsonl"
            path.write_text(
                "".join(json.dumps({"cell_id": c, "url": u}) + "\n" for c, u in cells[w::n])
            )
            # The worker writes to its own copy of the file; ours is closed at once.
            with (workdir / f"simulator-{w}.log").open("ab") as log:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "testing.simulator",
                        str(path),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=log,
                    )
                )
        sims = cls(processes, [asyncio.Queue() for _ in processes])
        sims.readers = [asyncio.create_task(sims._read(i)) for i in range(n)]
        sims.check(await sims._answers(), "ready")
        return sims

    async def _read(self, i: int) -> None:
        stdout = self.processes[i].stdout
        assert stdout is not None
        while line := (await stdout.readline()).decode().strip():
            if line.startswith("updated "):
                self.updated[line.split(" ", 1)[1]] += 1
                self.changed.set()
            else:
                await self.replies[i].put(line)
        await self.replies[i].put(f"exited with {await self.processes[i].wait()}")

    @staticmethod
    def check(answers: list[str], expected: str) -> None:
        for i, got in enumerate(answers):
            if got != expected:
                raise RuntimeError(f"simulator {i} answered {got!r}, not {expected!r}")

    async def _answers(self) -> list[str]:
        return [await replies.get() for replies in self.replies]

    async def command(self, command: str, expected: str) -> None:
        """Every worker does ``command``; returns once all have answered."""
        self.check(await self.ask(command), expected)

    async def ask(self, command: str) -> list[str]:
        """Every worker's answer to ``command``."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"{command}\n".encode())
            await process.stdin.drain()
        return await self._answers()

    async def ledger(self) -> dict[str, dict[str, list[int]]]:
        """What every cell applied: cell -> release -> generations."""
        merged: dict[str, dict[str, list[int]]] = {}
        for answer in await self.ask("ledger"):
            merged.update(json.loads(answer.removeprefix("ledger ")))
        return merged

    async def all_updated(self, version: str) -> None:
        """Until every worker's cells have all reported `succeeded` for ``version``."""
        while self.updated[version] < len(self.processes):
            self.changed.clear()
            await self.changed.wait()

    async def stop(self) -> None:
        await stop_workers(self.processes)
        for reader in self.readers:
            reader.cancel()


async def stop_workers(processes: list[asyncio.subprocess.Process]) -> None:
    """Close each worker's stdin (its cue to leave) and wait for it; kill one that lingers."""
    for process in processes:
        if process.returncode is None and process.stdin is not None:
            process.stdin.close()
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


def main() -> None:
    lines = Path(sys.argv[1]).read_text().splitlines()
    run(serve([SimCell(**json.loads(line)) for line in lines if line]))


if __name__ == "__main__":
    main()
