"""The bus when the broker is not there or will not take messages."""

from __future__ import annotations

import logging

import pytest

from common.bus.errors import NotConnected
from common.bus.rabbit_bus import RabbitBus


async def test_first_connection_is_retried_with_backoff_and_says_what_it_waits_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="common.bus")
    with pytest.raises(NotConnected, match="gave up after"):
        await RabbitBus.connect("amqp://svc:secret@127.0.0.1:1/", name="nobody", give_up_after=1.0)
    waits = [r.getMessage() for r in caplog.records if "waiting for the broker" in r.getMessage()]
    assert len(waits) >= 2
    assert "127.0.0.1:1" in waits[0] and "secret" not in waits[0]
