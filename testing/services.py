"""The broker, Redis and AWS endpoint a run uses, and a vhost and database of its own on them.

URLs come from SUBSTRATE_AMQP_URL / SUBSTRATE_REDIS_URL / SUBSTRATE_RABBITMQ_API_URL (make test
sets them for the local services). Where they are unset and Docker is present, testcontainers
starts RabbitMQ and Redis; where neither, the run fails saying so. A test session gets its own
vhost (created and deleted through the management API) and its own empty Redis database.
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

import redis.asyncio as aioredis

from common import broker_urls, topology
from common.bus.rabbit_bus import RabbitBus
from common.rabbitmq_api import RabbitApi
from testing.ports import free_port, wait_port

# The broker's AMQP URL, its management API's URL, Redis's URL.
ServiceUrls = tuple[str, str, str]


@dataclass(frozen=True)
class Services:
    amqp_url: str  # points at this session's vhost
    api_url: str
    redis_url: str  # points at this session's database
    vhost: str
    api: RabbitApi


def with_vhost(amqp_url: str, vhost: str) -> str:
    """The URL (every node's URL, for a cluster) with this vhost."""
    path = "/" + quote(vhost, safe="")
    return broker_urls.each(amqp_url, lambda url: urlunsplit(urlsplit(url)._replace(path=path)))


def with_db(redis_url: str, db: int) -> str:
    return urlunsplit(urlsplit(redis_url)._replace(path=f"/{db}"))


def _from_containers() -> Iterator[ServiceUrls]:
    # Read by testcontainers when it is imported. Its reaper (Ryuk) is one more image to pull,
    # and these containers are stopped by the context below anyway; docker_host reaches their
    # ports on this host wherever the run itself is.
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    from testcontainers.community.rabbitmq import RabbitMqContainer
    from testcontainers.community.redis import RedisContainer

    rabbit = (
        RabbitMqContainer("rabbitmq:3.10-management")
        .with_exposed_ports(15672)
        # The cap every deployment sets (scripts/ensure-services.sh for the local broker).
        .with_env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            f"-rabbit max_message_size {topology.BROKER_MAX_MESSAGE_BYTES}",
        )
    )
    with rabbit, RedisContainer("redis:7") as cache:
        host = rabbit.get_container_host_ip()
        amqp = f"amqp://guest:guest@{host}:{rabbit.get_exposed_port(5672)}/"
        api = f"http://guest:guest@{host}:{rabbit.get_exposed_port(15672)}"
        redis_url = f"redis://{host}:{cache.get_exposed_port(6379)}/0"
        yield amqp, api, redis_url


def service_urls() -> Iterator[ServiceUrls]:
    """The environment's services, or containers while the iterator is open."""
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
async def isolated_services(urls: ServiceUrls, label: str) -> AsyncIterator[Services]:
    """A new vhost and an empty Redis database, removed (with the broker users granted on the
    vhost) after."""
    amqp, api_url, redis_url = urls
    api = RabbitApi(api_url)
    vhost = f"substrate-{label}-{uuid.uuid4().hex[:8]}"
    user = broker_urls.user(amqp)
    await api.create_vhost(vhost)
    await api.set_permissions(vhost, user, configure=".*", write=".*", read=".*")
    db = await _free_redis_db(redis_url)
    try:
        yield Services(with_vhost(amqp, vhost), api_url, with_db(redis_url, db), vhost, api)
    finally:
        # Broker users are not per vhost: remove the cells' users this vhost saw created (every
        # user with permissions here but the one the tests connect as).
        granted = await api.call("GET", f"/vhosts/{quote(vhost, safe='')}/permissions")
        for grant in granted:
            if grant["user"] != user:
                await api.delete_user(grant["user"])
        await api.delete_vhost(vhost)
        client = aioredis.from_url(with_db(redis_url, db))
        await client.flushdb()
        await client.aclose()


async def declare_control_plane(amqp_url: str, name: str = "test-topology") -> None:
    """The control-plane topology, declared as the services declare it at start."""
    bus = await RabbitBus.connect(amqp_url, name=name)
    try:
        await bus.declare(topology.control_plane())
    finally:
        await bus.close()


@asynccontextmanager
async def declared(urls: ServiceUrls, label: str) -> AsyncIterator[Services]:
    """A vhost (with the control plane declared) and a Redis database on these services."""
    async with isolated_services(urls, label) as own:
        await declare_control_plane(own.amqp_url, f"{label}-topology")
        yield own


CLAIM = "substrate-test:claimed"


async def _free_redis_db(redis_url: str) -> int:
    """A database other than 0 (which make dev uses) that no live test session holds.

    A session claims its database with an expiring key; one left with data but no claim was
    abandoned by a run that died, and is emptied and taken.
    """
    for db in range(1, 14):  # 14 and 15 are left to the benchmarks
        client = aioredis.from_url(with_db(redis_url, db))
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


@asynccontextmanager
async def moto_server(log: Path) -> AsyncIterator[str]:
    """moto's server, the AWS API (STS, CloudFormation, ECR, S3, IAM, SNS, SQS) on loopback:
    its endpoint URL while open."""
    port = free_port()
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "moto_server"),
            *("-H", "127.0.0.1", "-p", str(port)),
            stdout=sink,
            stderr=sink,
            # AWS managed policies (ReadOnlyAccess, for debug access) exist only with this.
            env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        )
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
