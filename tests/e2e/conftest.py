"""Whole processes (testing/processes.py), started as a user would, and stopped by process id
at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.bus.rabbit_bus import RabbitBus
from testing.fleet import Fleet, forget_rollouts, quick_fleet
from testing.processes import Processes, Registry, running_processes, start_registry
from testing.services import Services, declare_control_plane


@pytest.fixture
async def procs(services: Services, tmp_path: Path) -> AsyncIterator[Processes]:
    async with running_processes(services, tmp_path) as running:
        yield running


@pytest.fixture
async def own_procs(fresh_services: Services, tmp_path: Path) -> AsyncIterator[Processes]:
    """Processes on a vhost and Redis database of the test's own, for a test whose rollout must
    see only its own cells (the session's vhost keeps the cells of every earlier test)."""
    await declare_control_plane(fresh_services.amqp_url, "test-own-topology")
    async with running_processes(fresh_services, tmp_path) as running:
        yield running


@pytest.fixture
async def own_bus(own_procs: Processes) -> AsyncIterator[RabbitBus]:
    b = await RabbitBus.connect(own_procs.services.amqp_url, name="test-own")
    yield b
    await b.close(drain_timeout=5)


@pytest.fixture
async def registry(procs: Processes, control_plane: None) -> Registry:
    return await start_registry(procs)


@pytest.fixture
async def fleet(
    procs: Processes, services: Services, moto: str, tmp_path: Path, bus: RabbitBus
) -> AsyncIterator[Fleet]:
    """A registry and a rollout service that know only this test's cells and releases: the
    session's earlier cells and releases are forgotten by rollout (its keys and queues)."""
    await forget_rollouts(services)
    await start_registry(procs)
    f = await quick_fleet(procs, moto, tmp_path, bus)
    await f.tap()
    yield f
