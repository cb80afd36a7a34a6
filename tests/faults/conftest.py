"""Fault tests run on a RabbitMQ node and a Redis of their own (testing/nodes.py), started
once per module: each test gets a new vhost and Redis database on them, and may kill, stop,
restart or pause either. A module that faults only processes runs on the machine's services
instead (its ``private`` fixture returns ``machine``): starting a private node costs each
module about ten seconds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.bus.rabbit_bus import RabbitBus
from testing.fleet import Fleet, quick_fleet
from testing.nodes import PrivateRabbit, PrivateRedis, running
from testing.processes import Processes, running_processes, start_registry
from testing.services import Services, declared


@pytest.fixture(scope="module")
async def rabbit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateRabbit]:
    async with running(PrivateRabbit(tmp_path_factory.mktemp("rabbit"))) as node:
        yield node


@pytest.fixture(scope="module")
async def redis_node(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateRedis]:
    async with running(PrivateRedis(tmp_path_factory.mktemp("redis"))) as node:
        yield node


@pytest.fixture
async def private(rabbit: PrivateRabbit, redis_node: PrivateRedis) -> AsyncIterator[Services]:
    """A vhost (with the control plane declared) and a Redis database on the private nodes."""
    if not rabbit.child.running:  # an earlier test of the module left it down
        await rabbit.start()
    if not redis_node.child.running:
        await redis_node.start()
    async with declared((rabbit.amqp_url, rabbit.api_url, redis_node.url), "fault") as own:
        yield own


@pytest.fixture
async def machine(service_urls: tuple[str, str, str]) -> AsyncIterator[Services]:
    """For a module that faults processes, not the broker or Redis: a vhost and database on the
    machine's services (no private node to start); such a module's ``private`` returns it."""
    async with declared(service_urls, "fault") as own:
        yield own


@pytest.fixture
async def fprocs(private: Services, tmp_path: Path) -> AsyncIterator[Processes]:
    """Whole processes against the private nodes, killed by process id at teardown."""
    async with running_processes(private, tmp_path) as running:
        yield running


@pytest.fixture
async def fbus(private: Services) -> AsyncIterator[RabbitBus]:
    b = await RabbitBus.connect(private.amqp_url, name="fault-test")
    yield b
    await b.close(drain_timeout=1)


@pytest.fixture
async def fleet(fprocs: Processes, moto: str, tmp_path: Path, fbus: RabbitBus) -> Fleet:
    """A registry, a rollout service with short soaks, and no cells yet, on the private nodes."""
    await start_registry(fprocs, SUBSTRATE_OFFLINE_AFTER_SECONDS="20")
    return await quick_fleet(fprocs, moto, tmp_path, fbus)
