"""A private RabbitMQ node and a private redis-server, child processes of the test run, so a fault
test can kill -9, stop, restart or pause them without touching the machine's shared services.

Each has its own ports, data directory and (RabbitMQ) node name and Erlang cookie; each runs in
its own process group, which is what a kill signals (by id, never by name). Data survives a kill
and a restart: that is what the fault tests look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from common.topology import BROKER_MAX_MESSAGE_BYTES
from testing.ports import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class PortTaken(AssertionError):
    """A private node stopped at start because one of its ports was in use."""


# The most open files this kind of machine lets a process have (its hard limit): the broker
# needs a socket per cell, and Debian's wrapper would reset it to 1,024.
NOFILE = 20_000


# Run through the shell so the limit is raised before the broker starts (no preexec_fn: the
# test process has threads).
_RAISED = f'ulimit -n {NOFILE} 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"'


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.2)


@dataclass
class _Child:
    """A process started in a group of its own (the group is what is signalled)."""

    process: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        with log.open("ab") as sink:
            self.process = subprocess.Popen(
                ["sh", "-c", _RAISED, argv[0], *argv],
                env=env,
                cwd=cwd,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    async def kill(self) -> None:
        """kill -9 of the whole group, waited for."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 30)
        # The group's other members (the broker's helpers) die with it; make sure.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class PrivateRabbit:
    """A RabbitMQ node of the test's own: ``start``, ``kill`` (kill -9), ``stop`` (graceful),
    ``pause``/``resume`` (SIGSTOP/SIGCONT), ``restart``; guest/guest on 127.0.0.1."""

    root: Path
    name: str = field(default_factory=lambda: f"substrate-fault-{uuid.uuid4().hex[:6]}")
    amqp_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    # A directory from scripts/certs.sh: the node also listens for AMQPS on ``amqps_port``.
    tls: Path | None = None
    amqps_port: int = field(default_factory=free_port)
    # More rabbitmq.conf lines (e.g. a short consumer_timeout).
    config: str = ""
    # HOME holds the Erlang cookie: the nodes of one cluster share it (default: ``root``).
    home: Path | None = None
    child: _Child = field(default_factory=_Child)
    _started: bool = False
    _log_from: int = 0

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def api_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.api_port}"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            # Its own cookie: HOME is where the Erlang cookie lives.
            "HOME": str(self.home or self.root),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "beam.pid"),
        }

    async def start(self, timeout: float = 90) -> None:
        assert (RABBITMQ_BIN / "rabbitmq-server").exists(), (
            "rabbitmq-server is missing: make test installs Debian's package"
        )
        for attempt in range(3):
            try:
                await self._start(timeout)
                break
            except PortTaken:
                # A port free when chosen was taken before the node bound it (an outgoing
                # connection's ephemeral port, say). Only a first start may move: after one,
                # clients hold these ports, and a restart must come back on them.
                if self._started or attempt == 2:
                    raise
                await self.child.kill()
                self.amqp_port, self.api_port = free_port(), free_port()
                self.prometheus_port, self.dist_port = free_port(), free_port()
                self.amqps_port = free_port()
        self._started = True

    async def _start(self, timeout: float) -> None:
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.api_port}\n"
            f"prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {self.prometheus_port}\n"
            "loopback_users = none\n"
            f"max_message_size = {BROKER_MAX_MESSAGE_BYTES}\n"
            + (
                f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}\n"
                f"ssl_options.cacertfile = {self.tls / 'ca.pem'}\n"
                f"ssl_options.certfile = {self.tls / 'broker.pem'}\n"
                f"ssl_options.keyfile = {self.tls / 'broker.key'}\n"
                "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
                if self.tls
                else ""
            )
            + self.config
        )
        (self.root / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_prometheus].\n")
        server_log = self.root / "server.log"
        self._log_from = server_log.stat().st_size if server_log.exists() else 0
        self.child.spawn(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            self._env(),
            self.root / "server.log",
            self.root,
        )
        await _until(self._answers, timeout, f"private RabbitMQ {self.node} up")

    def _answers(self) -> bool:
        """Up: the management API answers and the AMQP listener accepts (the API starts first,
        and a node whose AMQP port is taken stops after it)."""
        if not self.child.running:
            log = (self.root / "server.log").read_text(errors="replace")
            if "eaddrinuse" in log[self._log_from :]:
                raise PortTaken(f"private RabbitMQ {self.node}: a port was taken")
            raise AssertionError(f"private RabbitMQ {self.node} exited:\n{log[-2000:]}")
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/api/overview")
        request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status != 200:
                    return False
            with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=2):
                return True
        except OSError:
            return False

    async def ctl(self, *args: str) -> str:
        """rabbitmqctl against this node (with its cookie)."""
        process = await asyncio.create_subprocess_exec(
            str(RABBITMQ_BIN / "rabbitmqctl"),
            "-n",
            self.node,
            *args,
            env=self._env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"
        return out.decode().strip()

    async def kill(self) -> None:
        await self.child.kill()

    async def stop(self) -> None:
        """A graceful stop (what an operator's restart does)."""
        if self.child.running:
            await self.ctl("stop")
            assert self.child.process is not None
            await asyncio.to_thread(self.child.process.wait, 60)

    async def restart(self, *, graceful: bool = False) -> None:
        await (self.stop() if graceful else self.kill())
        await self.start()

    def pause(self) -> None:
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.signal(signal.SIGCONT)


@dataclass
class PrivateCluster:
    """Three (``size``) private RabbitMQ nodes joined in one cluster, each with its own name,
    ports and data directory, sharing a cookie. The control plane's service queues, declared
    once the cluster is formed, are quorum queues with a replica on every node."""

    root: Path
    size: int = 3
    nodes: list[PrivateRabbit] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nodes:
            self.root.mkdir(parents=True, exist_ok=True)
            self.nodes = [
                PrivateRabbit(self.root / f"node{i}", home=self.root) for i in range(self.size)
            ]

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated: the form SUBSTRATE_AMQP_URL takes for a cluster."""
        return ",".join(node.amqp_url for node in self.nodes)

    def api_url(self, exclude: PrivateRabbit | None = None) -> str:
        return next(n.api_url for n in self.nodes if n is not exclude and n.child.running)

    async def start(self, timeout: float = 180) -> None:
        await asyncio.gather(*(node.start(timeout) for node in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", first.node)
            await node.ctl("start_app")
        members = await first.ctl("eval", "length(rabbit_mnesia:cluster_nodes(running)).")
        assert members == str(self.size), f"cluster has {members} running nodes"

    async def kill(self) -> None:
        await asyncio.gather(*(node.kill() for node in self.nodes))


@dataclass
class PrivateRedis:
    """A redis-server of the test's own with AOF (``appendfsync`` as given), data kept across
    ``kill`` and ``start``."""

    root: Path
    fsync: str = "always"
    port: int = field(default_factory=free_port)
    # More redis-server arguments (e.g. --replicaof HOST PORT).
    args: tuple[str, ...] = ()
    child: _Child = field(default_factory=_Child)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 30) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: make test installs Debian's package"
        self.root.mkdir(parents=True, exist_ok=True)
        self.child.spawn(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.root),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync,
                "--save",
                "",
                "--daemonize",
                "no",
                *self.args,
            ],
            dict(os.environ),
            self.root / "redis.log",
            self.root,
        )
        await _until(self._answers, timeout, f"private Redis on {self.port} up")

    def _answers(self) -> bool:
        if not self.child.running:
            raise AssertionError(f"private Redis exited: {(self.root / 'redis.log').read_text()}")
        try:
            out = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "PONG"

    async def kill(self) -> None:
        await self.child.kill()

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    def pause(self) -> None:
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.signal(signal.SIGCONT)


@dataclass
class PrivateSentinel:
    """A Redis Sentinel of the test's own, monitoring ``primary`` as ``master`` (quorum 2 of the
    three a test starts) and declaring it down after one second of silence."""

    root: Path
    primary: PrivateRedis
    master: str = "substrate"
    port: int = field(default_factory=free_port)
    child: _Child = field(default_factory=_Child)

    async def start(self, timeout: float = 30) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: make test installs Debian's package"
        self.root.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its file as it learns the replicas and the sentinels.
        (self.root / "sentinel.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.root}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {self.master} 1000\n"
            f"sentinel failover-timeout {self.master} 10000\n"
        )
        self.child.spawn(
            [binary, str(self.root / "sentinel.conf"), "--sentinel"],
            dict(os.environ),
            self.root / "sentinel.log",
            self.root,
        )
        await _until(self._answers, timeout, f"private Sentinel on {self.port} up")

    def _answers(self) -> bool:
        if not self.child.running:
            raise AssertionError(f"Sentinel exited: {(self.root / 'sentinel.log').read_text()}")
        return self.primary_port() == self.primary.port

    def primary_port(self) -> int | None:
        """The port of the primary this sentinel names now."""
        try:
            out = subprocess.run(
                [
                    "redis-cli",
                    "-p",
                    str(self.port),
                    "sentinel",
                    "get-master-addr-by-name",
                    self.master,
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.split()
        except subprocess.TimeoutExpired:
            return None
        return int(out[1]) if len(out) == 2 and out[1].isdigit() else None

    async def kill(self) -> None:
        await self.child.kill()


N = TypeVar("N", PrivateRabbit, PrivateRedis, PrivateCluster)


@asynccontextmanager
async def running(node: N) -> AsyncIterator[N]:
    """A private node, started, and killed after: also when the start fails (a cluster whose
    third node did not come up leaves the other two running otherwise)."""
    try:
        await node.start()
        yield node
    finally:
        await node.kill()
