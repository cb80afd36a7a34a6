"""A service process whose handler is slow, for the graceful-shutdown test.

python -m tests.integration.slow_consumer QUEUE MARKER_DIR SECONDS
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from common import redis_client
from common.bus.rabbit_bus import RabbitBus
from common.messages import CellHeartbeat, Delivery
from common.outbox import Outbox
from common.routes import route
from common.runner import configure_logging, serve, wait_for_signal
from common.settings import ServiceSettings, load
from common.wiring import Consumed, Wiring


async def main(queue: str, markers: Path, seconds: float) -> None:
    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        (markers / f"started-{msg.seq}").touch()
        await asyncio.sleep(seconds)
        (markers / f"finished-{msg.seq}").touch()

    async def setup(bus: RabbitBus, settings: ServiceSettings) -> Wiring:
        redis = redis_client.from_settings(settings)
        return Wiring(
            redis=redis,
            outbox=Outbox(redis, "slow-consumer:outbox"),
            consumes=[Consumed(queue, [route(CellHeartbeat, on_heartbeat)], prefetch=1)],
            answers=[],
        )

    stop = asyncio.Event()
    waiter = asyncio.create_task(wait_for_signal(stop))
    await serve("slow-consumer", load(ServiceSettings), setup, stop)
    waiter.cancel()


if __name__ == "__main__":
    configure_logging("INFO")
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])))
