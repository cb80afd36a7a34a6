"""Fixtures for the real broker, Redis and AWS endpoint (the code behind them is in testing/).

Each test session gets its own vhost and empty Redis database; a test that needs the fleet to
itself takes ``fresh_services``, a vhost and database of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from common.bus.rabbit_bus import RabbitBus
from testing import services as shared
from testing.services import Services, ServiceUrls, declare_control_plane, isolated_services

# The tests operate as the broker user of their URL (guest on the local broker): an admin, as
# make test and make dev make it. Set before any service reads its settings.
os.environ.setdefault("SUBSTRATE_ADMINS", "guest,op-admin")


@pytest.fixture(scope="session")
def service_urls() -> Iterator[ServiceUrls]:
    yield from shared.service_urls()


@pytest.fixture(scope="session")
async def services(service_urls: ServiceUrls) -> AsyncIterator[Services]:
    async with isolated_services(service_urls, "test") as session:
        yield session


@pytest.fixture
async def fresh_services(service_urls: ServiceUrls) -> AsyncIterator[Services]:
    """For a test that needs the whole fleet to itself (the session's vhost holds the cells every
    earlier test left): its own vhost and Redis database, nothing declared."""
    async with isolated_services(service_urls, "own") as own:
        yield own


@pytest.fixture(scope="session")
async def control_plane(services: Services) -> None:
    """The control-plane topology declared once in this session's vhost."""
    await declare_control_plane(services.amqp_url)


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


@pytest.fixture(scope="session")
async def moto(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """moto's server: the AWS API on loopback, for the session."""
    async with shared.moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint
