"""The broker's socket limit as `status` reads it: summed over the nodes, read at most every
SOCKET_LIMIT_TTL_SECONDS, and a slow management API gives the last limit read (or none)
instead of holding the registry's answer past an operator's timeout."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from common.bus.rabbit_bus import RabbitBus
from common.rabbitmq_api import RabbitApi
from services.registry import broker
from services.registry.broker import CellBroker


class FakeApi:
    def __init__(self, *nodes: dict[str, Any]) -> None:
        self.nodes = list(nodes)
        self.calls = 0
        self.hang = False

    async def call(self, method: str, path: str) -> list[dict[str, Any]]:
        assert (method, path) == ("GET", "/nodes")
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        return self.nodes


def _broker(api: FakeApi) -> CellBroker:
    return CellBroker(cast(RabbitApi, api), cast(RabbitBus, None), "/", socket_limit_wait=0.1)


async def test_the_limit_is_summed_over_the_nodes_and_read_once_in_a_while() -> None:
    api = FakeApi({"sockets_total": 800}, {"sockets_total": 900}, {"name": "starting"})
    cells = _broker(api)
    assert await cells.socket_limit() == 1700
    api.nodes = [{"sockets_total": 5}]
    assert await cells.socket_limit() == 1700  # within the TTL: not read again
    assert api.calls == 1


async def test_a_node_that_does_not_say_is_asked_again() -> None:
    api = FakeApi({"name": "just started"})
    cells = _broker(api)
    assert await cells.socket_limit() is None
    api.nodes = [{"sockets_total": 830}]
    assert await cells.socket_limit() == 830
    assert api.calls == 2


async def test_a_slow_api_gives_the_last_limit_without_holding_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = FakeApi({"sockets_total": 830})
    cells = _broker(api)
    api.hang = True
    # Nothing read yet: no limit, and the answer is not held past the wait.
    assert await asyncio.wait_for(cells.socket_limit(), 5) is None
    api.hang = False
    assert await cells.socket_limit() == 830
    monkeypatch.setattr(broker, "SOCKET_LIMIT_TTL_SECONDS", 0.0)  # the limit read is stale
    api.hang = True
    assert await asyncio.wait_for(cells.socket_limit(), 5) == 830
    assert api.calls == 3
