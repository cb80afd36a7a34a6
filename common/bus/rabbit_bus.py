"""RabbitBus: one connection to the broker, and what a process does with it.

A small facade: each part lives in a module of its own (``connection``, ``publish``,
``consume``, ``rpc``, ``queues``, ``shutdown``), and the bus only wires them together and
hands each call to its part.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiormq

from common import broker_urls
from common.audit import Guard
from common.bus import rpc
from common.bus.connection import ClusterConnection, open_connection
from common.bus.consume import HANDLER_RETRY_SECONDS, Consumers
from common.bus.errors import BusError
from common.bus.publish import Publisher
from common.bus.queues import Queues
from common.bus.shutdown import Stopping
from common.metrics import bus_metrics
from common.routes import Route

log = logging.getLogger(__name__)


class RabbitBus:
    """A connection to the broker with one confirming publish channel and a channel per
    consumer. Build it with ``await RabbitBus.connect(url, name=...)``.

    - ``publish(message, ...)``: persistent, confirmed, mandatory (``publish.Publisher``);
    - ``consume(queue, routes, ...)``: validate, handle, ack, retry, dead-letter
      (``consume.Consumers``);
    - ``serve(service, routes)``, ``call(request)`` and ``request(...)``: request/reply
      (``rpc``);
    - ``declare(topology)``, ``delete_queue``, ``queue_exists``, ``queue_state`` (``queues``);
    - ``stop_consuming`` and ``close``: shutdown with the handlers in flight (``shutdown``).
    """

    def __init__(
        self,
        connection: ClusterConnection,
        publisher: Publisher,
        *,
        name: str,
        namespace: str,
        stopping: Stopping,
        handler_retry_seconds: float = HANDLER_RETRY_SECONDS,
    ) -> None:
        self._conn = connection
        self.name = name
        self.publisher = publisher
        self._stopping = stopping
        self._queues = Queues(connection)
        self._consumers = Consumers(
            connection,
            publisher=publisher,
            queues=self._queues,
            metrics=bus_metrics(namespace),
            stopping=stopping,
            retry_seconds=handler_retry_seconds,
        )
        self._rpc = rpc.RpcClient(publisher)
        # The parts' own methods are the bus's: each is documented (and typed) where it is
        # written, not again here.
        self.publish = publisher.publish
        self.consume = self._consumers.consume
        self.request = self._rpc.request
        self.call = self._rpc.call
        self.declare = self._queues.declare
        self.delete_queue = self._queues.delete
        self.queue_exists = self._queues.exists
        self.queue_state = self._queues.state
        self._reconnect_hooks: list[Callable[[], Awaitable[None]]] = []
        connection.reconnect_callbacks.add(self._on_reconnect)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        publish_timeout: float = 10.0,
        namespace: str = "substrate",
        give_up_after: float | None = None,
        max_backoff: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        handler_retry_seconds: float = HANDLER_RETRY_SECONDS,
        fail_fast: bool = False,
    ) -> RabbitBus:
        """Connect (see ``connection.open_connection``: one URL or a cluster's, the first
        connection retried with backoff up to ``give_up_after``). Every message published
        carries the URL's user as ``user_id``; metrics are named ``<namespace>_bus_...``."""
        connection = await open_connection(
            url,
            name=name,
            give_up_after=give_up_after,
            max_backoff=max_backoff,
            ssl_context=ssl_context,
            fail_fast=fail_fast,
        )
        stopping = Stopping()
        publisher = await Publisher.open(
            connection,
            user=broker_urls.user(url),
            timeout=publish_timeout,
            metrics=bus_metrics(namespace),
            stopping=stopping,
        )
        log.info("connected to %s as %s", broker_urls.redact(str(connection.url)), publisher.user)
        return cls(
            connection,
            publisher,
            name=name,
            namespace=namespace,
            stopping=stopping,
            handler_retry_seconds=handler_retry_seconds,
        )

    # -- the connection -----------------------------------------------------------------------

    @property
    def user(self) -> str:
        """The broker user: the ``user_id`` of every message this bus publishes."""
        return self.publisher.user

    @property
    def publish_timeout(self) -> float:
        return self.publisher.deadlines.seconds

    @publish_timeout.setter
    def publish_timeout(self, seconds: float) -> None:
        self.publisher.deadlines.seconds = seconds

    @property
    def handler_retry_seconds(self) -> float:
        """The pause before a failed delivery is tried again, doubled at each failure."""
        return self._consumers.retry_seconds

    @handler_retry_seconds.setter
    def handler_retry_seconds(self, seconds: float) -> None:
        self._consumers.retry_seconds = seconds

    @property
    def is_connected(self) -> bool:
        return self.publisher.connected

    @property
    def node(self) -> str:
        """host:port of the broker node this connection uses (of a cluster's, the current one)."""
        return self._conn.node

    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` after every reconnect, once the channels are restored."""
        self._reconnect_hooks.append(hook)

    async def _on_reconnect(self, *_: Any) -> None:
        log.info("reconnected to the broker; consumers are being restored")
        for hook in self._reconnect_hooks:
            asyncio.get_running_loop().create_task(self._run_hook(hook))

    async def _run_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        try:
            await self.publisher.channel.ready()
            await hook()
        except Exception:
            log.exception("reconnect hook failed")

    async def update_secret(self, password: str) -> None:
        """Re-authenticate the open connection with a new password (AMQP update-secret) and
        use it for every later reconnect. The broker refuses a secret that does not
        authenticate this user."""
        try:
            await self._conn.update_secret(password, reason="credential rotation")
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
            raise BusError(f"broker refused the new secret: {exc!r}") from exc

    # -- requests -----------------------------------------------------------------------------

    async def serve(
        self,
        service: str,
        routes: Sequence[Route],
        *,
        before_reply: Callable[[], Awaitable[None]] | None = None,
        guard: Guard | None = None,
    ) -> None:
        """Answer requests to ``service`` with ``routes`` (``rpc.serve``)."""
        await rpc.serve(
            self._consumers,
            self.publisher,
            service,
            routes,
            before_reply=before_reply,
            guard=guard,
        )

    # -- stopping -----------------------------------------------------------------------------

    async def stop_consuming(self, drain_timeout: float = 30.0) -> bool:
        """Cancel every consumer and wait for in-flight handlers to finish and ack.

        Returns False if handlers were still running after ``drain_timeout``.
        """
        self._stopping.begin()
        await self._consumers.cancel()
        return await self._stopping.drain(drain_timeout, self._consumers.send_acks)

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop consuming, let in-flight handlers finish, then close the connection."""
        await self.stop_consuming(drain_timeout)
        self._rpc.close()
        self.publisher.deadlines.stop()
        try:
            async with asyncio.timeout(10):
                await self._conn.close()
        except TimeoutError:
            log.warning("the broker connection did not close within 10s; leaving it")
