"""Whole processes, started as a user would (the console scripts of this virtualenv), and
stopped by process id: the services, cell agents and substratectl."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from common.bus.errors import BusError
from common.bus.rabbit_bus import RabbitBus
from common.requests import Request
from common.requests.flags import FlagsList
from common.requests.infra import InfraList
from common.requests.registry import CellsList
from common.requests.rollout import PolicyShow
from testing.polling import eventually
from testing.ports import free_port
from testing.services import Services

BIN = Path(sys.executable).parent
R = TypeVar("R")


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Processes:
    services: Services
    logs: Path
    running: list[Proc] = field(default_factory=list)
    _bus: RabbitBus | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "SUBSTRATE_AMQP_URL": self.services.amqp_url,
            "SUBSTRATE_REDIS_URL": self.services.redis_url,
            "SUBSTRATE_RABBITMQ_API_URL": self.services.api_url,
            # substratectl's wait for an answer: the flows are under test, not the speed of a
            # loaded machine (a test of the timeout itself sets its own).
            "SUBSTRATE_RPC_TIMEOUT_SECONDS": "30",
            **extra,
        }

    async def start(self, name: str, *argv: str, **env: str) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                str(BIN / argv[0]), *argv[1:], env=self.env(**env), stdout=sink, stderr=sink
            )
        proc = Proc(name, process, log)
        self.running.append(proc)
        return proc

    async def stop(self, proc: Proc, timeout: float = 20) -> int:
        if proc.process.returncode is None:
            proc.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.process.wait(), timeout)
            except TimeoutError:
                proc.process.kill()
                await proc.process.wait()
        assert proc.process.returncode is not None
        return proc.process.returncode

    async def ask(self, request: Request[R]) -> R:
        """What substratectl would be answered, asked from the test's own process, as the same
        broker user. For bounded polls: a substratectl each time round costs a second of CPU,
        which on two busy cores slowed the very processes being waited for. What a test
        asserts still comes from substratectl (``ctl``), run once the poll says it will do."""
        if self._bus is None:
            self._bus = await RabbitBus.connect(
                self.services.amqp_url, name=f"test-look-{uuid.uuid4().hex[:6]}", max_backoff=1
            )
        return await self._bus.call(request, timeout=30)

    async def look(self, request: Request[R]) -> R | None:
        """``ask``, or None where the bus cannot answer (a broker a fault test killed, not yet
        reconnected to): the poll then runs substratectl, which says what is wrong."""
        try:
            return await self.ask(request)
        except BusError:
            return None

    async def answers(self, request: Request[Any]) -> bool:
        """Whether the service ``request`` goes to answers it (false on any failure)."""
        try:
            await self.ask(request)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        if self._bus is not None:
            # Bounded, and never failing the teardown: a fault test may have left its broker
            # dead, and the test's own verdict is already in.
            with suppress(Exception):
                await asyncio.wait_for(self._bus.close(drain_timeout=1), 10)
            self._bus = None

    async def ctl(self, *args: str, **env: str) -> tuple[int, Any, str]:
        """Run ``substratectl --json ARGS``: exit code, parsed stdout, stderr."""
        code, out, err = await self.ctl_text("--json", *args, **env)
        return code, json.loads(out) if out.strip() else None, err

    async def ctl_text(self, *args: str, **env: str) -> tuple[int, str, str]:
        """Run ``substratectl ARGS`` as a person would (no --json): exit code, stdout, stderr."""
        process = await asyncio.create_subprocess_exec(
            str(BIN / "substratectl"),
            *args,
            env=self.env(**env),
            # Nobody at a terminal: a command that would ask (decommission) needs --yes.
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace"), err.decode()


@asynccontextmanager
async def running_processes(services: Services, logs: Path) -> AsyncIterator[Processes]:
    running = Processes(services, logs)
    try:
        yield running
    finally:
        for proc in reversed(running.running):
            if proc.process.returncode is None:
                proc.process.kill()
                await proc.process.wait()
        await running.close()


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def metric(port: int, name: str, **labels: str) -> float:
    """The value of one sample a process serves on ``port`` (``/metrics``), 0 if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in (await http_get(port, "/metrics"))[1].splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name_of, _, label_text = sample.partition("{")
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if name_of == name and got == want:
            return float(value)
    return 0.0


@dataclass
class Service:
    """A running service process and its metrics port."""

    proc: Proc
    metrics_port: int

    async def metrics(self) -> str:
        return (await http_get(self.metrics_port, "/metrics"))[1]

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample, 0 if absent."""
        return await metric(self.metrics_port, name, **labels)

    async def metric_at_least(self, name: str, n: float, **labels: str) -> bool:
        return await self.metric(name, **labels) >= n


Registry = Service


async def start_registry(procs: Processes, **env: str) -> Registry:
    port = free_port()
    settings = {
        "SUBSTRATE_METRICS_PORT": str(port),
        # Short enough for the tests that wait for a cell to go offline, long enough that an
        # agent heartbeating every 0.5 s on a busy machine never looks offline by accident.
        "SUBSTRATE_OFFLINE_AFTER_SECONDS": "5",
        "SUBSTRATE_SWEEP_INTERVAL_SECONDS": "0.2",
        **env,
    }
    proc = await procs.start(f"registry-{port}", "substrate-registry", **settings)

    await eventually(
        partial(procs.answers, CellsList(stage="saas")),
        timeout=30,
        interval=0.3,
        what="registry answering",
    )
    return Registry(proc, port)


async def start_rollout(procs: Processes, **env: str) -> Service:
    port = free_port()
    proc = await procs.start(
        f"rollout-{len(procs.running)}",
        "substrate-rollout",
        SUBSTRATE_TICK_SECONDS="0.2",
        SUBSTRATE_LEASE_SECONDS="3",
        SUBSTRATE_METRICS_PORT=str(port),
        **env,
    )

    await eventually(
        partial(procs.answers, PolicyShow()), timeout=30, interval=0.3, what="rollout answering"
    )
    return Service(proc, port)


async def start_flags(procs: Processes, **env: str) -> Proc:
    proc = await procs.start(f"flags-{len(procs.running)}", "substrate-flags", **env)

    await eventually(
        partial(procs.answers, FlagsList()), timeout=30, interval=0.3, what="flags answering"
    )
    return proc


async def start_infra(procs: Processes, moto: str, **env: str) -> Proc:
    """infra_compliance against moto's server, its templates in a bucket of its own."""
    from testing.services import aws_env

    proc = await procs.start(
        f"infra-{len(procs.running)}",
        "substrate-infra-compliance",
        SUBSTRATE_TEMPLATES_BUCKET=f"templates-{uuid.uuid4().hex[:8]}",
        SUBSTRATE_TICK_SECONDS="0.2",
        **{**aws_env(moto), **env},
    )

    await eventually(
        partial(procs.answers, InfraList()),
        timeout=30,
        interval=0.3,
        what="infra_compliance answering",
    )
    return proc


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """The (address, port) pairs a process listens on, read from /proc (TCP, IPv4 and 6)."""
    import os
    import socket
    import struct

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = [
                    struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0])
                    for i in range(0, len(raw), 4)
                ]
                found.append((socket.inet_ntop(family, b"".join(words)), int(port_hex, 16)))
    return found


async def start_control_plane(procs: Processes, moto: str) -> None:
    """The four services, each answering, against moto's server for AWS."""
    await start_registry(procs)
    await start_rollout(procs)
    await start_flags(procs)
    await start_infra(procs, moto)
