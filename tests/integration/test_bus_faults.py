"""The bus when the broker is not there or will not take messages."""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest

from common.bus import NotConnected, PublishTimeout, RabbitBus
from tests.helpers import cell_queue, eventually, heartbeat, new_cell_id


async def test_first_connection_is_retried_with_backoff_and_says_what_it_waits_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="common.bus")
    with pytest.raises(NotConnected, match="not reachable after"):
        await RabbitBus.connect("amqp://svc:secret@127.0.0.1:1/", name="nobody", give_up_after=1.0)
    waits = [r.getMessage() for r in caplog.records if "waiting for the broker" in r.getMessage()]
    assert len(waits) >= 2
    assert "127.0.0.1:1" in waits[0] and "secret" not in waits[0]


async def _rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def test_a_broker_memory_alarm_gives_a_publish_timeout_not_a_hang(bus: RabbitBus) -> None:
    """RELIABILITY 17: under a memory alarm the broker blocks publishers. The local broker is
    needed for rabbitmqctl; the watermark is restored whatever happens."""
    assert shutil.which("rabbitmqctl"), "rabbitmqctl is needed to raise a memory alarm"
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    before = await _rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    bus.publish_timeout = 1.0
    try:
        await _rabbitmqctl("set_vm_memory_high_watermark", "0.000001")
        with pytest.raises(PublishTimeout, match="memory or disk alarm"):
            await bus.publish(heartbeat(cell, seq=1))
    finally:
        await _rabbitmqctl("set_vm_memory_high_watermark", before)
    bus.publish_timeout = 10.0

    # Once the alarm clears the publisher is unblocked and publishing works again.
    async def publishes() -> bool:
        try:
            await bus.publish(heartbeat(cell, seq=2))
        except (PublishTimeout, NotConnected):
            return False
        return True

    await eventually(publishes, timeout=30, interval=0.5, what="publishing after the alarm")
    assert (await bus.queue_state(queue)).messages >= 1
