"""SIGTERM to a service while a slow handler runs: it finishes, acks, and exits cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from common.bus.rabbit_bus import RabbitBus
from testing.broker import cell_queue
from testing.cells import heartbeat, new_cell_id
from testing.polling import eventually
from testing.services import Services


async def test_sigterm_lets_the_running_handler_finish_and_ack(
    services: Services, bus: RabbitBus, tmp_path: Path
) -> None:
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    env = {
        **os.environ,
        "SUBSTRATE_AMQP_URL": services.amqp_url,
        "SUBSTRATE_REDIS_URL": services.redis_url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.slow_consumer",
        queue,
        str(tmp_path),
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await eventually(
            lambda: _consumers(bus, queue, 1), what="slow consumer attached", timeout=20
        )
        await bus.publish(heartbeat(cell, seq=1))
        await eventually((tmp_path / "started-1").exists, what="handler started")

        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0, output.decode()
    assert (tmp_path / "finished-1").exists()
    state = await bus.queue_state(queue)
    assert state.consumers == 0
    # Had the handler not acked before the connection closed, the message would be ready again.
    assert state.messages == 0
    assert b"slow-consumer stopped" in output


async def _consumers(bus: RabbitBus, queue: str, n: int) -> bool:
    return (await bus.queue_state(queue)).consumers == n
