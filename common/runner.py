"""Running a process until SIGTERM: parse --help, read settings once, start, drain, close.

On SIGTERM or SIGINT a service stops consuming, lets in-flight handlers finish and ack, then
closes its connections; whatever was prefetched but not started goes back to the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from common import topology
from common.bus.rabbit_bus import RabbitBus
from common.memory import map_large_blocks
from common.metrics import MetricsServer
from common.settings import ServiceSettings, load
from common.wiring import Wiring, start

log = logging.getLogger(__name__)
T = TypeVar("T")

# A service's bootstrap: given the bus and the service's settings (its own settings class
# extends ServiceSettings), it builds its parts.
Setup = Callable[[RabbitBus, Any], Awaitable[Wiring]]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the process's event loop: uvloop where it is installed (it is a dependency on
    Linux), else asyncio's own. The loop's per-message overhead is a large part of a
    consumer's CPU time; uvloop roughly halves it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - other platforms
        return asyncio.run(main)
    return uvloop.run(main)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aio-pika logs every reconnect attempt at INFO with a traceback; ours says it once.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    # botocore says at INFO where it found each endpoint and credential, on every client.
    logging.getLogger("botocore").setLevel(logging.WARNING)


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds: how a loop sleeps
    until it is stopped, woken, or due."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def wait_for_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def instance_name(service: str) -> str:
    """The broker connection name: which service, on which host, which process."""
    return f"{service}@{socket.gethostname()}:{os.getpid()}"


async def serve(service: str, settings: ServiceSettings, setup: Setup, stop: asyncio.Event) -> None:
    """Connect, declare the control-plane topology (unless the broker's definitions hold it),
    serve metrics, build the service's parts with ``setup`` and start them (common/wiring.py),
    and run until ``stop`` is set."""
    bus = await RabbitBus.connect(
        settings.amqp_url,
        name=instance_name(service),
        publish_timeout=settings.publish_timeout_seconds,
        handler_retry_seconds=settings.handler_retry_seconds,
    )
    if settings.declare_topology:
        await bus.declare(topology.control_plane())
    server = MetricsServer(
        lambda: {"ok": bus.is_connected, "service": service, "broker_connected": bus.is_connected},
        settings.metrics_host,
        settings.metrics_port,
    )
    await server.start()
    cleanup = await start(service, bus, settings, await setup(bus, settings))
    log.info("%s ready", service)
    await stop.wait()
    log.info("%s stopping: no new messages, finishing the ones in flight", service)
    drained = await bus.stop_consuming(settings.drain_timeout_seconds)
    await cleanup()
    await bus.close(0 if not drained else settings.drain_timeout_seconds)
    await server.stop()
    log.info("%s stopped", service)


def service_main(
    service: str,
    description: str,
    setup: Setup,
    settings_cls: type[ServiceSettings] = ServiceSettings,
) -> None:
    """The console-script entry point of a control-plane service."""
    parser = argparse.ArgumentParser(
        prog=f"substrate-{service.replace('_', '-')}",
        description=description,
        epilog="Configured by environment variables: SUBSTRATE_AMQP_URL, SUBSTRATE_REDIS_URL, "
        "SUBSTRATE_RABBITMQ_API_URL, SUBSTRATE_METRICS_PORT (see docs/operating.md).",
    )
    parser.parse_args()
    settings = load(settings_cls)
    configure_logging(settings.log_level)
    map_large_blocks()

    async def main() -> None:
        stop = asyncio.Event()
        waiter = asyncio.create_task(wait_for_signal(stop))
        try:
            await serve(service, settings, setup, stop)
        finally:
            waiter.cancel()
            with suppress(asyncio.CancelledError):
                await waiter

    run(main())
