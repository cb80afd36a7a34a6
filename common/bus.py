"""RabbitBus: the only module that touches aio-pika.

Every reliability setting lives here, once: durable objects, persistent delivery, publisher
confirms with ``mandatory`` (an unroutable message is an error, never silence), ``user_id`` on
every publish, a timeout on every publish (a blocked broker gives an error, not a hang),
validation before a handler runs, ack only after the handler returns, and dead-lettering with a
reason instead of requeueing forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
    UnderlayConnection,
)
from aiormq.abc import DeliveredMessage
from pydantic import BaseModel, ValidationError
from yarl import URL

from common import broker_urls, crashpoints
from common.acks import BatchedAcks
from common.crashpoints import crash_point
from common.deadlines import Deadlines
from common.messages import (
    DLX_EXCHANGE,
    CellReport,
    Delivery,
    Message,
    RpcErrorBody,
    RpcReply,
    RpcRequest,
    rpc_queue,
    sender_problem,
)
from common.metrics import bus_metrics, cell_messages_refused
from common.requests import Request
from common.routes import Handler, Route, routes_for
from common.topology import DELIVERY_LIMIT, Topology, dead_letter_name

log = logging.getLogger(__name__)

R = TypeVar("R")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
DEAD_REASON_HEADER = "x-substrate-dead-reason"
# 256 KiB: the largest legitimate message (a desired state with a release manifest, a flags
# snapshot) is a few tens of KiB; anything larger from a cell is abuse or a bug.
MAX_BODY_BYTES = 256 * 1024
_MAX_REASON = 1000
# How often a consumer the broker cancelled (its queue was deleted) looks for the queue again.
CONSUMER_RETRY_SECONDS = 1.0
# A read the broker nacked is sent again after this long, until its timeout.
NACKED_RETRY_SECONDS = 0.25
# A delivery whose handler failed is handed back after this pause, doubled at each failure
# after the first and capped: with the delivery limit of 5, 1 + 2 + 4 + 8 = 15 s pass before a
# message that keeps failing is dead-lettered, long enough to ride out a Redis failover.
HANDLER_RETRY_SECONDS = 1.0
HANDLER_RETRY_CAP_SECONDS = 30.0
# Failed deliveries a consumer of a classic queue keeps count of: its prefetch's worth, unless
# deliveries it handed back were settled by another consumer and so never forgotten here.
MAX_COUNTED_FAILURES = 1024


class BusError(Exception):
    """A bus operation failed in a way the caller must see."""


class NotConnected(BusError):
    """The broker connection is down; the caller decides to retry or fail."""


class Unroutable(BusError):
    """A mandatory publish matched no queue."""


class PublishRefused(BusError):
    """The broker refused a publish (nack, forged user_id, missing permission)."""


class PublishNacked(PublishRefused):
    """The broker nacked a publish: a queue it routes to could not take it (a quorum queue
    between leaders while a node is lost, a full queue that rejects publishes)."""


class PublishTimeout(BusError):
    """The broker did not confirm in time (blocked by a memory or disk alarm, or overloaded)."""


class QueueMissing(BusError):
    """A queue the caller expected is not there."""


class ServiceUnavailable(BusError):
    """A request found no service to answer it."""


class RequestTimeout(ServiceUnavailable):
    """A request was not answered in time."""


class RemoteError(BusError):
    """The service answered a request with an error."""

    def __init__(self, service: str, code: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.code = code
        self.message = message


class Refused(Exception):
    """Raised by a handler for a message that must never be retried (e.g. a forged sender):
    the bus dead-letters it at once with this reason."""


def refuse_foreign_sender(msg: CellReport, delivery: Delivery) -> None:
    """Dead-letter (never retry) and count a cell report that speaks for another cell."""
    problem = sender_problem(msg, delivery)
    if problem is not None:
        cell_messages_refused().labels(problem[0]).inc()
        raise Refused(problem[1])


class RpcFailure(Exception):
    """Raised by an RPC method: the caller gets it as a RemoteError with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class QueueState:
    messages: int
    consumers: int


@dataclass(frozen=True, slots=True)
class _Routes:
    """How one consumed queue's deliveries are handled."""

    queue: str
    by_type: Mapping[str, tuple[type[Message], Handler]]
    delivery_limit: int
    max_body_bytes: int
    # Dead-letter by rejecting (the queue's own dead-letter exchange) instead of republishing
    # with the reason: for consumers that may not publish to the dead-letter exchange (cells).
    reject: bool = False
    # Failures so far of the deliveries being retried, by message id: a classic queue does not
    # count deliveries (only whether one is a redelivery), so the consumer counts them itself.
    failures: dict[str, int] = field(default_factory=dict)

    def failures_of(self, message: _Delivered) -> int:
        """How many times this delivery has failed before: the quorum queue's count, else
        ours (at least one for a redelivery, which may have failed in an earlier process)."""
        raw_count = message.headers.get("x-delivery-count")
        if isinstance(raw_count, int):
            return raw_count
        counted = self.failures.get(message.message_id or "", 0)
        return max(counted, int(message.redelivered))

    def failed(self, message: _Delivered, attempts: int) -> None:
        if message.message_id is None:
            return
        if len(self.failures) >= MAX_COUNTED_FAILURES:
            # Deliveries another consumer took over are never settled here: drop the oldest.
            del self.failures[next(iter(self.failures))]
        self.failures[message.message_id] = attempts

    def settled(self, message: _Delivered) -> None:
        if self.failures:
            self.failures.pop(message.message_id or "", None)


@dataclass(slots=True)
class _Consumer:
    """A consumer issued on the underlying channel, not through aio-pika's queue object, so
    deliveries skip aio-pika's message object (see ``_Delivered``). The bus reissues it when
    the robust channel reopens and when the broker cancels it (``_keep_consuming``)."""

    channel: AbstractRobustChannel
    queue: str
    callback: Callable[[DeliveredMessage], Coroutine[Any, Any, None]]
    underlay: aiormq.Channel | None = None
    tag: str | None = None
    # A reopen and a cancel may both reissue it: one at a time, or it would consume twice.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Waiting for its queue to come back (``_recover``), if it is.
    recovering: asyncio.Task[None] | None = None


class _Delivered:
    """A delivery as the broker sent it, its properties read when asked.

    aio-pika's consumer decodes every property into an IncomingMessage up front and runs a
    second task per delivery (about 20 us a message here, against about 70 us for all of the
    registry's own work on a heartbeat: bench/RESULTS.md); the bus reads a few properties,
    most of them only when something goes wrong.
    """

    __slots__ = ("_props", "body", "channel", "delivery_tag", "redelivered", "routing_key")

    def __init__(self, message: DeliveredMessage) -> None:
        self.body = message.body
        self.channel = message.channel
        deliver = message.delivery
        assert isinstance(deliver, aiormq.spec.Basic.Deliver)
        self.delivery_tag: int = deliver.delivery_tag or 0
        self.redelivered = bool(deliver.redelivered)
        self.routing_key: str = deliver.routing_key or ""
        self._props = message.header.properties

    @property
    def type(self) -> str | None:
        return self._props.message_type

    @property
    def headers(self) -> dict[str, Any]:
        return self._props.headers or {}

    @property
    def message_id(self) -> str | None:
        return self._props.message_id

    @property
    def user_id(self) -> str | None:
        return self._props.user_id

    @property
    def correlation_id(self) -> str | None:
        return self._props.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._props.reply_to

    @property
    def content_type(self) -> str | None:
        return self._props.content_type


def _what(message: aio_pika.Message, exchange: str, routing_key: str) -> str:
    return f"{message.type} to {exchange or '(default)'}/{routing_key}"


def validation_summary(exc: ValidationError) -> str:
    """One line naming each field and its problem."""
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (+{more} more)" if more > 0 else "")


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection over the nodes of a RabbitMQ cluster.

    aio-pika's ``RobustConnection`` reconnects to the one URL it was given; a client of a
    cluster whose node dies must go to another node. This one keeps every node's URL and gives
    each connection attempt the next one in turn, from ``first_node``. Everything else
    (restoring channels, consumers and reconnect callbacks) is aio-pika's own.
    """

    def __init__(self, urls: list[str], first_node: int, **kwargs: Any) -> None:
        self._urls = [URL(url) for url in urls]
        first = first_node % len(urls)
        # Every attempt, the first included, moves to the next node; start one before.
        self._node = (first - 1) % len(self._urls)
        self._transport: UnderlayConnection | None = None
        super().__init__(self._urls[first], **kwargs)

    # aio-pika's robust connection clears ``transport`` at the start of every connection attempt,
    # and also in its constructor and when closing (both before or while ``_close_in_progress``
    # is set); the attempts are where the next node is chosen. Connecting then reads ``url``.
    @property
    def transport(self) -> UnderlayConnection | None:
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        if value is None and getattr(self, "_close_in_progress", True) is False:
            self._node = (self._node + 1) % len(self._urls)
        self._transport = value

    @property
    def url(self) -> URL:
        return self._urls[self._node]

    @url.setter
    def url(self, value: URL) -> None:
        # Set by aio-pika's constructor and again by update_secret with the new password: the
        # nodes of a cluster share users, so the credentials apply to every node.
        self._urls = [url.with_user(value.user).with_password(value.password) for url in self._urls]

    @property
    def node(self) -> str:
        """host:port of the node this connection uses (or tries next)."""
        return f"{self.url.host}:{self.url.port}"


class RabbitBus:
    """A connection to the broker with one confirming publish channel and a channel per
    consumer. Build it with ``await RabbitBus.connect(url, name=...)``."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        publish_channel: AbstractRobustChannel,
        *,
        user: str,
        name: str,
        publish_timeout: float,
        namespace: str,
        handler_retry_seconds: float = HANDLER_RETRY_SECONDS,
    ) -> None:
        self._conn = connection
        self.handler_retry_seconds = handler_retry_seconds
        self._pub = publish_channel
        self.user = user
        self.name = name
        self._deadlines = Deadlines(publish_timeout)
        self._metrics = bus_metrics(namespace)
        self._exchanges: dict[str, aio_pika.Exchange] = {}
        self._consumers: list[_Consumer] = []
        self._pending: dict[str, asyncio.Future[RpcReply]] = {}
        self._reply_queue: AbstractQueue | None = None
        self._reply_lock = asyncio.Lock()
        self._renew_lock = asyncio.Lock()
        self._inspect: AbstractRobustChannel | None = None
        self._inspect_lock = asyncio.Lock()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Set once stop_consuming begins: no new work, and held deliveries are handed back.
        self._stopped = asyncio.Event()
        self._reconnect_hooks: list[Callable[[], Awaitable[None]]] = []
        # One acker per underlying channel: tags restart when a channel is reopened.
        self._ackers: dict[int, BatchedAcks] = {}
        connection.reconnect_callbacks.add(self._on_reconnect)

    # -- connecting ---------------------------------------------------------------------------

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
    ) -> RabbitBus:
        """Connect, retrying the first connection with backoff.

        ``url`` is one broker URL or the comma-separated URLs of a cluster's nodes; each attempt
        goes to the next node, and so does every reconnect after a node is lost.
        ``connect_robust`` only recovers a connection that once succeeded; a broker that is not
        up yet at start would otherwise be a crash. ``give_up_after`` (seconds) bounds the wait.
        """
        urls = broker_urls.split(url)
        started = time.monotonic()
        delay = 0.25
        attempt = 0
        first_node = random.randrange(len(urls))
        while True:
            attempt += 1
            connection = ClusterConnection(
                urls,
                first_node=first_node + attempt - 1,
                client_properties={"connection_name": name},
                # amqps:// URLs: verified against this context's CAs (None: the system's).
                ssl_context=ssl_context,
            )
            try:
                await connection.connect(timeout=10)
                break
            except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
                waited = time.monotonic() - started
                if give_up_after is not None and waited + delay > give_up_after:
                    where = broker_urls.redact(url)
                    raise NotConnected(
                        f"broker at {where} not reachable after {waited:.1f}s: {exc!r}"
                    ) from exc
                log.warning(
                    "waiting for the broker at %s (attempt %d, %r); retrying in %.1fs",
                    broker_urls.redact(str(connection.url)),
                    attempt,
                    exc,
                    delay,
                )
                # Every node of a cluster tried once without a pause, then the backoff.
                if attempt % len(urls) == 0:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, max_backoff)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(channel, aio_pika.RobustChannel)
        user = broker_urls.user(url)
        log.info("connected to %s as %s", broker_urls.redact(str(connection.url)), user)
        return cls(
            connection,
            channel,
            user=user,
            name=name,
            publish_timeout=publish_timeout,
            namespace=namespace,
            handler_retry_seconds=handler_retry_seconds,
        )

    @property
    def publish_timeout(self) -> float:
        return self._deadlines.seconds

    @publish_timeout.setter
    def publish_timeout(self, seconds: float) -> None:
        self._deadlines.seconds = seconds

    @property
    def is_connected(self) -> bool:
        return not self._conn.is_closed and self._conn.connected.is_set()

    @property
    def node(self) -> str:
        """host:port of the broker node this connection uses (of a cluster's, the current one)."""
        assert isinstance(self._conn, ClusterConnection)
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
            await self._pub.ready()
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

    # -- topology -----------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings. Idempotent for the same arguments."""
        channel = await self._conn.channel()
        try:
            for ex in topology.exchanges:
                await channel.declare_exchange(ex.name, ex.type, durable=True, robust=False)
            for spec in topology.queues:
                queue = await channel.declare_queue(
                    spec.name, durable=True, arguments=spec.arguments(), robust=False
                )
                for binding in spec.bindings:
                    await queue.bind(binding.exchange, binding.routing_key, robust=False)
                # The broker answers an unbind of a binding it does not have with unbind-ok.
                for binding in spec.retired:
                    await queue.unbind(binding.exchange, binding.routing_key)
        finally:
            await channel.close()

    async def delete_queue(self, name: str) -> None:
        channel = await self._conn.channel()
        try:
            await channel.queue_delete(name)
        finally:
            await channel.close()

    async def queue_exists(self, name: str) -> bool:
        """Whether queue ``name`` exists: one passive declaration on a channel kept for it
        (a queue_state or a declare costs opening and closing a channel besides). Callers are
        served one at a time, as a channel carries one such request at a time."""
        async with self._inspect_lock:
            if self._inspect is None or self._inspect.is_closed:
                self._inspect = await self._conn.channel()
            try:
                await self._inspect.declare_queue(name, passive=True, robust=False)
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._inspect = None  # the broker closed the channel with its answer
                return False

    async def queue_state(self, name: str) -> QueueState:
        """Messages ready and consumers attached, straight from the broker (not the
        management API's sampled statistics)."""
        channel = await self._conn.channel()
        try:
            queue = await channel.declare_queue(name, passive=True, robust=False)
            result = queue.declaration_result
            return QueueState(result.message_count or 0, result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise QueueMissing(f"queue {name!r} does not exist") from None
        finally:
            if not channel.is_closed:
                await channel.close()

    # -- publishing ---------------------------------------------------------------------------

    async def _renew_publish_channel(self, nacked: AbstractRobustChannel) -> None:
        """Publish on a new channel from now on.

        Seen on a RabbitMQ 3.10 cluster: a channel whose first publish to a quorum queue lands
        while the queue elects a new leader (a client that reconnected to another node within
        milliseconds of losing its own) has every later publish nacked, for as long as the
        channel lives. A nack is rare otherwise (a queue refusing publishes when full), and a new
        channel costs one round trip.
        """
        async with self._renew_lock:
            if self._pub is not nacked or not self.is_connected:
                return
            fresh = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            assert isinstance(fresh, aio_pika.RobustChannel)
            self._pub, self._exchanges = fresh, {}
            # Direct reply-to is consumed on the channel that publishes the requests: the next
            # request consumes it again on the new one (replies due on the old one are lost,
            # and their requests time out).
            self._reply_queue = None
            log.warning("the broker nacked a publish; publishing on a new channel")
            with suppress(Exception):
                await nacked.close()

    async def _reopened(self, channel: AbstractRobustChannel, timeout: float | None) -> None:
        """Until ``channel`` reopens (or the timeout). Its ``ready()`` cannot tell: just after
        the broker closed it, the channel still says it is restored."""
        reopened = asyncio.Event()

        def on_reopen(*_: Any) -> None:
            reopened.set()

        channel.reopen_callbacks.add(on_reopen)
        try:
            if channel.is_closed:
                with suppress(TimeoutError):
                    async with self._deadlines.guard(timeout):
                        await reopened.wait()
        finally:
            channel.reopen_callbacks.discard(on_reopen)

    def _exchange(self, name: str) -> aio_pika.Exchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            # Not declared here: the control plane declares exchanges, and a cell may not.
            exchange = aio_pika.Exchange(self._pub, name)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self,
        message: Message,
        *,
        exchange: str | None = None,
        routing_key: str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: float | None = None,
        headers: dict[str, Any] | None = None,
        user_id: str | None = None,
        mandatory: bool = True,
        confirm_timeout: float | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm.

        The exchange and routing key default to the message's own. Raises Unroutable,
        PublishRefused, PublishTimeout (after ``confirm_timeout``, default the bus's
        ``publish_timeout``) or NotConnected; on return the message is on disk.
        """
        amqp_message = aio_pika.Message(
            message.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            type=message.wire_name,
            message_id=message_id or uuid.uuid4().hex,
            timestamp=datetime.now(UTC),
            user_id=user_id or self.user,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=expiration,
            headers=headers,
        )
        await self._publish_raw(
            amqp_message,
            message.exchange if exchange is None else exchange,
            message.routing_key() if routing_key is None else routing_key,
            mandatory=mandatory,
            timeout=confirm_timeout,
        )

    async def _publish_raw(
        self,
        message: aio_pika.Message,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool,
        timeout: float | None = None,
    ) -> None:
        outcome = "error"
        channel = self._pub
        try:
            if channel.is_closed and self.is_connected and not self._stopped.is_set():
                # After a reconnect the channels reopen one at a time, a consumer's perhaps
                # before this one: a handler's reply (or a dead letter) would fail here and its
                # delivery spend a try of its limit. With the connection up, the channel is
                # moments away: wait for it.
                await self._reopened(channel, timeout)
            if channel.is_closed or not self.is_connected:
                raise NotConnected(
                    f"cannot publish {_what(message, exchange, routing_key)}: "
                    "not connected to the broker"
                )
            try:
                async with self._deadlines.guard(timeout):
                    await self._exchange(exchange).publish(
                        message, routing_key, mandatory=mandatory
                    )
                    if crashpoints.DUPLICATES:
                        await self._exchange(exchange).publish(
                            message, routing_key, mandatory=mandatory
                        )
            except TimeoutError:
                outcome = "timeout"
                raise PublishTimeout(
                    f"broker did not confirm {_what(message, exchange, routing_key)} within "
                    f"{self.publish_timeout if timeout is None else timeout}s (is it blocked by "
                    "a memory or disk alarm?)"
                ) from None
            except aio_pika.exceptions.PublishError:
                outcome = "unroutable"
                what = _what(message, exchange, routing_key)
                raise Unroutable(f"{what} is unroutable: no queue is bound for it") from None
            except aio_pika.exceptions.DeliveryError as exc:
                outcome = "refused"
                what = _what(message, exchange, routing_key)
                await self._renew_publish_channel(channel)
                raise PublishNacked(f"broker refused {what}: {exc}") from None
            except aiormq.exceptions.ChannelInvalidStateError as exc:
                what = _what(message, exchange, routing_key)
                raise NotConnected(f"cannot publish {what}: {exc}") from exc
            except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
                # The broker closes the channel for a forged user_id or a missing permission.
                outcome = "refused"
                what = _what(message, exchange, routing_key)
                raise PublishRefused(f"broker refused {what}: {exc}") from None
            outcome = "confirmed"
        finally:
            self._metrics.count_published(message.type or "", outcome)

    # -- consuming ----------------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        routes: Sequence[Route],
        *,
        prefetch: int = 32,
        delivery_limit: int = DELIVERY_LIMIT,
        max_body_bytes: int = MAX_BODY_BYTES,
        reject_to_dead: bool = False,
    ) -> None:
        """Consume ``queue``: each delivery is validated into the model its ``type`` names and
        handed to that model's handler; acked when the handler returns.

        The queue must exist (the control plane declares it). It is obtained with a passive
        declare on a robust channel so the consumer is restored after a reconnect.
        """
        by_type: dict[str, tuple[type[Message], Handler]] = {}
        for model, handler in routes_for(routes).items():
            assert issubclass(model, Message), f"{model.__name__} is not a message"
            by_type[model.wire_name] = (model, handler)
        channel = await self._conn.channel()
        assert isinstance(channel, aio_pika.RobustChannel)
        await channel.set_qos(prefetch_count=prefetch)
        # Passive: the robust channel checks the queue again whenever it reopens.
        await channel.declare_queue(queue, passive=True)
        handling = _Routes(queue, by_type, delivery_limit, max_body_bytes, reject_to_dead)
        consumer = _Consumer(channel, queue, partial(self._on_delivery, handling))
        await self._start_consumer(consumer)
        channel.reopen_callbacks.add(partial(self._restart_consumer, consumer))
        self._consumers.append(consumer)
        log.info("consuming %s (%s)", queue, ", ".join(sorted(by_type)))

    async def _start_consumer(self, consumer: _Consumer) -> None:
        """Issue ``consumer`` on its channel as it is now, unless it already consumes there."""
        async with consumer.lock:
            underlay = await consumer.channel.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)
            if underlay is consumer.underlay and consumer.tag in underlay.consumers:
                return
            if underlay is not consumer.underlay:
                underlay.on_consumer_cancel_callbacks.add(partial(self._on_cancelled, consumer))
            consumer.underlay = underlay
            ok = await underlay.basic_consume(consumer.queue, consumer.callback)
            consumer.tag = ok.consumer_tag

    async def _restart_consumer(self, consumer: _Consumer, *_: Any) -> None:
        # The robust channel reopened (a reconnect, or the channel closed on an error) and
        # restored its qos and the passive declare; the consumer is ours to reissue.
        if self._stopped.is_set():
            return
        try:
            await self._start_consumer(consumer)
            log.info("consuming %s again after its channel reopened", consumer.queue)
        except Exception as exc:
            log.warning("could not consume %s after a reopen: %r", consumer.queue, exc)
            self._keep_consuming(consumer)

    def _on_cancelled(self, consumer: _Consumer, frame: Any) -> None:
        if self._stopped.is_set() or frame.consumer_tag != consumer.tag:
            return
        # The broker cancels a consumer whose queue went away (deleted, or its node lost).
        log.warning(
            "the broker cancelled the consumer of %s; waiting for the queue", consumer.queue
        )
        self._keep_consuming(consumer)

    def _keep_consuming(self, consumer: _Consumer) -> None:
        if consumer.recovering is None or consumer.recovering.done():
            consumer.recovering = asyncio.get_running_loop().create_task(self._recover(consumer))

    async def _recover(self, consumer: _Consumer) -> None:
        while not self._stopped.is_set():
            try:
                if await self.queue_exists(consumer.queue):
                    await self._start_consumer(consumer)
                    log.info("consuming %s again", consumer.queue)
                    return
            except Exception as exc:
                log.warning("could not consume %s yet: %r", consumer.queue, exc)
            await asyncio.sleep(CONSUMER_RETRY_SECONDS)

    async def _on_delivery(self, routes: _Routes, delivered: DeliveredMessage) -> None:
        queue = routes.queue
        message = _Delivered(delivered)
        started = time.perf_counter()
        self._inflight += 1
        self._idle.clear()
        outcome = "acked"
        try:
            outcome = await self._handle(routes, message)
        except Exception:
            # Acking, nacking or dead-lettering failed (the channel went away): the broker
            # redelivers whatever was not acked, which is the behaviour we want.
            log.exception("could not settle a delivery from %s", queue)
            outcome = "unsettled"
        finally:
            self._metrics.count_consumed(queue, outcome, time.perf_counter() - started)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _handle(self, routes: _Routes, message: _Delivered) -> str:
        queue, max_body_bytes = routes.queue, routes.max_body_bytes
        if self._stopped.is_set():
            # Shutting down: hand it back to the queue for another replica or our next start.
            await self._nack(message)
            return "requeued"
        if len(message.body) > max_body_bytes:
            return await self._dead(
                routes, message, f"body of {len(message.body)} bytes exceeds {max_body_bytes}"
            )
        entry = routes.by_type.get(message.type or "")
        if entry is None:
            return await self._dead(routes, message, f"unknown type {message.type!r} on {queue}")
        model_cls, handler = entry
        try:
            model = model_cls.model_validate_json(message.body)
        except ValidationError as exc:
            return await self._dead(
                routes, message, f"invalid {message.type}: {validation_summary(exc)}"
            )
        failures = routes.failures_of(message)
        delivery = Delivery(
            message_id=message.message_id,
            user_id=message.user_id,
            routing_key=message.routing_key,
            redelivered=message.redelivered,
            delivery_count=failures,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
        )
        try:
            await handler(model, delivery)
        except Refused as exc:
            return await self._dead(routes, message, f"refused: {exc}")
        except Exception as exc:
            attempts = failures + 1
            if attempts >= routes.delivery_limit:
                log.exception("handler for %s failed %d times; dead-lettering", queue, attempts)
                return await self._dead(
                    routes, message, f"handler failed {attempts} times, last: {exc!r}"
                )
            return await self._retry_later(
                routes, message, attempts, f"handler for {queue} failed: {exc!r}"
            )
        crash_point("bus.before-ack", message.type or "")
        routes.settled(message)
        self._ack(message)
        return "acked"

    async def _retry_later(
        self, routes: _Routes, message: _Delivered, attempts: int, why: str
    ) -> str:
        """Hand a delivery back to its queue after a pause that doubles with its failures."""
        pause = min(self.handler_retry_seconds * 2.0 ** (attempts - 1), HANDLER_RETRY_CAP_SECONDS)
        log.warning("%s (attempt %d); retrying in %.1fs", why, attempts, pause)
        # Held (unacked) through the pause: a failure that lasts (Redis down) fills the
        # prefetch and slows consuming instead of spending the delivery limit in a few ms.
        await self._pause_unless_stopping(pause)
        routes.failed(message, attempts)
        await self._nack(message)
        return "retried"

    async def _pause_unless_stopping(self, seconds: float) -> None:
        """Wait ``seconds``, or less once the bus stops consuming (the delivery then goes back
        to the queue for another replica at once)."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()

    def _acker(self, message: _Delivered) -> BatchedAcks:
        channel = message.channel
        acker = self._ackers.get(id(channel))
        if acker is None or acker.channel is not channel:
            acker = self._ackers[id(channel)] = BatchedAcks(channel)
        return acker

    def _ack(self, message: _Delivered) -> None:
        self._acker(message).ack(message.delivery_tag)

    async def _nack(self, message: _Delivered) -> None:
        await message.channel.basic_nack(message.delivery_tag, requeue=True)
        self._acker(message).settled_otherwise(message.delivery_tag)

    async def _dead(self, routes: _Routes, message: _Delivered, reason: str) -> str:
        """Move a delivery to ``<queue>.dead`` with the reason in a header, then ack it (or,
        where it cannot be moved, hand it back to be tried again).

        The broker's own dead-lettering (reject) cannot carry a reason, so we republish. The
        original sender goes in a header: ``user_id`` must be our own user on republish.
        """
        queue = routes.queue
        reason = reason[:_MAX_REASON]
        log.warning("dead-lettering a message from %s: %s", queue, reason)
        if routes.reject:
            await message.channel.basic_reject(message.delivery_tag, requeue=False)
            self._acker(message).settled_otherwise(message.delivery_tag)
            routes.settled(message)
            return "dead_lettered"
        headers = dict(message.headers)
        headers.update(
            {
                DEAD_REASON_HEADER: reason,
                "x-substrate-original-queue": queue,
                "x-substrate-original-routing-key": message.routing_key,
                "x-substrate-original-user-id": message.user_id or "",
            }
        )
        dead = aio_pika.Message(
            message.body,
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            type=message.type,
            message_id=message.message_id,
            timestamp=datetime.now(UTC),
            user_id=self.user,
            headers=headers,
        )
        try:
            await self._publish_raw(dead, DLX_EXCHANGE, dead_letter_name(queue), mandatory=True)
        except BusError as exc:
            # Not moved (its dead letter queue deleted, the broker refusing): handed back to be
            # tried again. Held unsettled it would hold back the acks of every later delivery
            # on this channel until the prefetch filled and consuming stopped.
            return await self._retry_later(
                routes, message, routes.failures_of(message) + 1,
                f"could not dead-letter a message from {queue}: {exc!r}",
            )  # fmt: skip
        routes.settled(message)
        self._ack(message)
        return "dead_lettered"

    # -- request/reply ------------------------------------------------------------------------

    async def serve(
        self,
        service: str,
        routes: Sequence[Route],
        *,
        before_reply: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Answer requests to ``service``: each route's model is a Request, validated from the
        envelope's params; the handler's result is its response. RpcFailure and
        ValidationError become error replies the caller raises. ``before_reply`` runs after a
        handler succeeded and before its answer goes out (e.g. waiting for Redis replicas); an
        RpcFailure from it is the answer instead."""
        methods: dict[str, tuple[type[Request[Any]], Handler]] = {}
        for model, handler in routes_for(routes).items():
            assert issubclass(model, Request), f"{model.__name__} is not a request"
            methods[model.method] = (model, handler)

        async def on_request(request: RpcRequest, delivery: Delivery) -> None:
            if not delivery.reply_to:
                raise Refused("request without reply_to")
            found = methods.get(request.method)
            try:
                if found is None:
                    raise RpcFailure(
                        "unknown_method",
                        f"{service} has no method {request.method!r} "
                        f"(it has: {', '.join(sorted(methods))})",
                    )
                model, handler = found
                result = await handler(model.model_validate(request.params), delivery)
                if before_reply is not None:
                    await before_reply()
                # As any: a response may be a subclass of the declared one (each service's
                # status), and its own fields are part of the answer.
                answer = model.response.dump_python(result, mode="json", serialize_as_any=True)
                reply = RpcReply(ok=True, result=answer)
            except RpcFailure as exc:
                reply = RpcReply(ok=False, error=RpcErrorBody(code=exc.code, message=exc.message))
            except ValidationError as exc:
                reply = RpcReply(
                    ok=False,
                    error=RpcErrorBody(code="invalid", message=validation_summary(exc)),
                )
            except Exception as exc:
                log.exception("%s.%s failed", service, request.method)
                reply = RpcReply(
                    ok=False,
                    error=RpcErrorBody(code="internal", message=f"{type(exc).__name__}: {exc}"),
                )
            # Not mandatory: a caller that gave up has no reply queue any more, and that is
            # not an error of this service.
            await self.publish(
                reply,
                routing_key=delivery.reply_to,
                correlation_id=delivery.correlation_id,
                mandatory=False,
            )

        await self.consume(rpc_queue(service), [Route(RpcRequest, on_request)])

    async def _ensure_reply_consumer(self) -> None:
        async with self._reply_lock:
            if self._reply_queue is not None:
                return
            # Direct reply-to must be consumed (no-ack) on the channel that publishes the
            # requests. A passive declare keeps it in the robust channel's restore list.
            queue = await self._pub.declare_queue(DIRECT_REPLY_TO, passive=True)
            await queue.consume(self._on_reply, no_ack=True)
            self._reply_queue = queue

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply that arrived after its request timed out
        try:
            future.set_result(RpcReply.model_validate_json(message.body))
        except ValidationError as exc:
            future.set_exception(BusError(f"malformed reply: {validation_summary(exc)}"))

    async def request(
        self,
        service: str,
        method: str,
        params: BaseModel | Mapping[str, Any] | None = None,
        *,
        timeout: float = 5.0,
    ) -> Any:
        """Call ``method`` on ``service`` and return its result.

        Raises RequestTimeout (naming the service) when nobody answers in time, and
        RemoteError when the service answers with an error.
        """
        await self._ensure_reply_consumer()
        if isinstance(params, BaseModel):
            params = params.model_dump(mode="json")
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[RpcReply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            request = RpcRequest(service=service, method=method, params=dict(params or {}))
            try:
                await self.publish(
                    request,
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                    # A request nobody answered in time must not be acted on later.
                    expiration=timeout,
                )
            except Unroutable:
                raise ServiceUnavailable(
                    f"service {service!r} is unavailable: no queue receives its requests"
                ) from None
            try:
                async with asyncio.timeout(timeout):
                    reply = await future
            except TimeoutError:
                raise RequestTimeout(
                    f"service {service!r} did not answer {method!r} within {timeout:g}s "
                    "(is it running?)"
                ) from None
        finally:
            self._pending.pop(correlation_id, None)
        if not reply.ok:
            error = reply.error or RpcErrorBody(code="internal", message="error without detail")
            raise RemoteError(service, error.code, error.message)
        return reply.result

    async def call(
        self, request: Request[R], *, service: str | None = None, timeout: float = 5.0
    ) -> R:
        """Send a typed request and return its typed response. ``service`` is needed only for
        a request every service answers (``Status``).

        A request that only reads is sent again while the broker nacks it, within ``timeout``:
        a service queue between leaders (a cluster node just lost) nacks for a few seconds. A
        write is not: the caller decides.
        """
        to = service or request.service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                result = await self.request(
                    to, request.method, request, timeout=max(deadline - loop.time(), 0.1)
                )
                break
            except PublishNacked:
                if not request.read_only or loop.time() + NACKED_RETRY_SECONDS >= deadline:
                    raise
                log.info("%s.%s nacked by the broker; asking again", to, request.method)
                await asyncio.sleep(NACKED_RETRY_SECONDS)
        try:
            answer: R = request.response.validate_python(result)
        except ValidationError as exc:
            raise BusError(
                f"{to} answered {request.method!r} with an unexpected result: "
                f"{validation_summary(exc)}"
            ) from None
        return answer

    # -- stopping -----------------------------------------------------------------------------

    async def stop_consuming(self, drain_timeout: float = 30.0) -> bool:
        """Cancel every consumer and wait for in-flight handlers to finish and ack.

        Returns False if handlers were still running after ``drain_timeout``.
        """
        self._stopped.set()
        for consumer in self._consumers:
            if consumer.recovering is not None:
                consumer.recovering.cancel()
            if consumer.underlay is None or consumer.tag is None or consumer.underlay.is_closed:
                continue
            try:
                # Bounded: with the broker unreachable the answer may never come, and shutdown
                # must not wait for it.
                async with asyncio.timeout(5):
                    await consumer.underlay.basic_cancel(consumer.tag)
            except Exception as exc:
                log.warning("could not cancel consumer on %s: %r", consumer.queue, exc)
        try:
            async with asyncio.timeout(drain_timeout):
                await self._idle.wait()
                for acker in list(self._ackers.values()):
                    await acker.drain()
        except TimeoutError:
            log.error("%d handlers still running after %.0fs", self._inflight, drain_timeout)
            return False
        except Exception as exc:
            log.warning("could not send the last acks: %r (they will be redelivered)", exc)
        return True

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop consuming, let in-flight handlers finish, then close the connection."""
        await self.stop_consuming(drain_timeout)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected("bus closed"))
        self._deadlines.stop()
        try:
            async with asyncio.timeout(10):
                await self._conn.close()
        except TimeoutError:
            log.warning("the broker connection did not close within 10s; leaving it")
