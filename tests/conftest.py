"""Fixtures for the real broker and Redis.

URLs come from SUBSTRATE_AMQP_URL / SUBSTRATE_REDIS_URL / SUBSTRATE_RABBITMQ_API_URL (make test
sets them for the local services). Where they are unset and Docker is present, testcontainers
starts RabbitMQ and Redis; where neither, the run fails saying so. Each test session gets its
own vhost (created and deleted through the management API) and its own empty Redis database;
a test that needs the fleet to itself takes `fresh_services`, a vhost and database of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from common import broker_urls, topology
from common.bus.rabbit_bus import RabbitBus
from common.rabbitmq_api import RabbitApi


@dataclass(frozen=True)
class Services:
    amqp_url: str  # points at this session's vhost
    api_url: str
    redis_url: str  # points at this session's database
    vhost: str
    api: RabbitApi


def _with_vhost(amqp_url: str, vhost: str) -> str:
    """The URL (every node's URL, for a cluster) with this vhost."""
    path = "/" + quote(vhost, safe="")
    return broker_urls.each(amqp_url, lambda url: urlunsplit(urlsplit(url)._replace(path=path)))


def _with_db(redis_url: str, db: int) -> str:
    return urlunsplit(urlsplit(redis_url)._replace(path=f"/{db}"))


def _from_containers() -> Iterator[tuple[str, str, str]]:
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    with (
        RabbitMqContainer("rabbitmq:3.10-management") as rabbit,
        RedisContainer("redis:7") as cache,
    ):
        rabbit.with_exposed_ports(5672, 15672)
        host = rabbit.get_container_host_ip()
        amqp = f"amqp://guest:guest@{host}:{rabbit.get_exposed_port(5672)}/"
        api = f"http://guest:guest@{host}:{rabbit.get_exposed_port(15672)}"
        redis_url = f"redis://{host}:{cache.get_exposed_port(6379)}/0"
        yield amqp, api, redis_url


@pytest.fixture(scope="session")
def service_urls() -> Iterator[tuple[str, str, str]]:
    amqp = os.environ.get("SUBSTRATE_AMQP_URL")
    api = os.environ.get("SUBSTRATE_RABBITMQ_API_URL")
    redis_url = os.environ.get("SUBSTRATE_REDIS_URL")
    if amqp and api and redis_url:
        yield amqp, api, redis_url
    elif shutil.which("docker") and os.path.exists("/var/run/docker.sock"):
        yield from _from_containers()
    else:
        raise RuntimeError(
            "no RabbitMQ/Redis for the tests: set SUBSTRATE_AMQP_URL, SUBSTRATE_REDIS_URL and "
            "SUBSTRATE_RABBITMQ_API_URL (make test does), or run where Docker is available"
        )


@asynccontextmanager
async def isolated_services(
    service_urls: tuple[str, str, str], label: str
) -> AsyncIterator[Services]:
    """A new vhost and an empty Redis database, removed (with the broker users granted on the
    vhost) after."""
    amqp, api_url, redis_url = service_urls
    api = RabbitApi(api_url)
    vhost = f"substrate-{label}-{uuid.uuid4().hex[:8]}"
    user = broker_urls.user(amqp)
    await api.create_vhost(vhost)
    await api.set_permissions(vhost, user, configure=".*", write=".*", read=".*")
    db = await _free_redis_db(redis_url)
    try:
        yield Services(_with_vhost(amqp, vhost), api_url, _with_db(redis_url, db), vhost, api)
    finally:
        # Broker users are not per vhost: remove the cells' users this vhost saw created (every
        # user with permissions here but the one the tests connect as).
        granted = await api.call("GET", f"/vhosts/{quote(vhost, safe='')}/permissions")
        for grant in granted:
            if grant["user"] != user:
                await api.delete_user(grant["user"])
        await api.delete_vhost(vhost)
        client = aioredis.from_url(_with_db(redis_url, db))
        await client.flushdb()
        await client.aclose()


@pytest.fixture(scope="session")
async def services(service_urls: tuple[str, str, str]) -> AsyncIterator[Services]:
    async with isolated_services(service_urls, "test") as session:
        yield session


@pytest.fixture
async def fresh_services(service_urls: tuple[str, str, str]) -> AsyncIterator[Services]:
    """For a test that needs the whole fleet to itself (the session's vhost holds the cells every
    earlier test left): its own vhost and Redis database, nothing declared."""
    async with isolated_services(service_urls, "own") as own:
        yield own


CLAIM = "substrate-test:claimed"


async def _free_redis_db(redis_url: str) -> int:
    """A database other than 0 (which make dev uses) that no live test session holds.

    A session claims its database with an expiring key; one left with data but no claim was
    abandoned by a run that died, and is emptied and taken.
    """
    for db in range(1, 14):  # 14 and 15 are left to the benchmarks
        client = aioredis.from_url(_with_db(redis_url, db))
        try:
            if await client.exists(CLAIM):
                continue
            if await client.dbsize() > 0:
                await client.flushdb()
            if await client.set(CLAIM, "1", nx=True, ex=3600):
                return db
        finally:
            await client.aclose()
    raise RuntimeError("no free Redis database among 1..13 for this test session")


@pytest.fixture(scope="session")
async def control_plane(services: Services) -> None:
    """The control-plane topology declared once in this session's vhost."""
    bus = await RabbitBus.connect(services.amqp_url, name="test-topology")
    await bus.declare(topology.control_plane())
    await bus.close()


@pytest.fixture
async def bus(services: Services, control_plane: None) -> AsyncIterator[RabbitBus]:
    b = await RabbitBus.connect(services.amqp_url, name=f"test-{uuid.uuid4().hex[:6]}")
    yield b
    await b.close(drain_timeout=5)


@pytest.fixture
async def other_bus(services: Services, control_plane: None) -> AsyncIterator[RabbitBus]:
    b = await RabbitBus.connect(services.amqp_url, name=f"test-other-{uuid.uuid4().hex[:6]}")
    yield b
    await b.close(drain_timeout=5)


# Ports for private nodes and processes come from below the kernel's ephemeral range (32768 and
# up on Linux, where outgoing connections take theirs), each pytest-xdist worker from a block of
# its own: the kernel may give the same free port to two processes, and two private nodes must
# never be given one.
PORTS_FROM = 20000
PORTS_PER_WORKER = 2000


# Ports are handed out in rising order through the worker's block, wrapping at its end: a port
# comes round again only after the block's other ports did, long after its test finished.
@dataclass
class _PortCursor:
    at: int | None = None


_PORTS = _PortCursor()


def _port_block() -> range:
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    start = PORTS_FROM + worker * PORTS_PER_WORKER
    assert start + PORTS_PER_WORKER <= 32000, f"no block of ports for xdist worker {worker}"
    return range(start, start + PORTS_PER_WORKER)


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports nobody listens on now, from this worker's
    block, none handed out recently."""
    block = _port_block()
    last = block.stop - count  # the highest base whose ports all lie in the block
    start = block.start if _PORTS.at is None else _PORTS.at
    bases: list[int] = [*range(start, last + 1), *range(block.start, min(start, last + 1))]
    for base in bases:
        if all(_is_free(p) for p in range(base, base + count)):
            _PORTS.at = base + count
            return base
    raise AssertionError(f"no {count} consecutive free ports in {block}")


def free_port() -> int:
    """A port nobody listens on now, and not one this worker handed out recently."""
    return free_ports(1)


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"nothing listening on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.1)


@pytest.fixture(scope="session")
async def moto(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """moto's server: the AWS API (STS, CloudFormation, ECR, S3, IAM, SNS, SQS) on loopback."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port),
            stdout=sink, stderr=sink,
            # AWS managed policies (ReadOnlyAccess, for debug access) exist only with this.
            env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        )  # fmt: skip
    try:
        await wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "eu-west-1",
    }
