"""Consuming: validate, hand to the handler, ack after its effect, retry with a pause,
dead-letter with the reason.

Each delivery is validated into the model its ``type`` names and handed to that model's
handler; it is acked when the handler returns. Invalid JSON, a wrong schema, an unknown type
or an oversized body goes at once to ``<queue>.dead`` with the reason in a header; a handler
that keeps failing is tried again after a doubling pause and dead-lettered with its last error
at the queue's delivery limit. The rest of the stream keeps flowing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, DeliveryMode
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from common.bus.acks import BatchedAcks
from common.bus.errors import BusError, Refused, TryAgain, validation_summary
from common.bus.publish import Publisher
from common.bus.queues import Queues
from common.bus.shutdown import Stopping
from common.crashpoints import crash_point
from common.messages import DLX_EXCHANGE, Delivery, Message
from common.metrics import BusMetrics
from common.routes import Handler, Route, routes_for
from common.topology import DELIVERY_LIMIT, dead_letter_name

log = logging.getLogger(__name__)

DEAD_REASON_HEADER = "x-substrate-dead-reason"
# An oversized body is dead-lettered cut to its first bytes, its size in this header.
ORIGINAL_BYTES_HEADER = "x-substrate-original-bytes"
KEPT_OF_OVERSIZED_BODY = 4096
# 256 KiB: the largest legitimate message (a desired state with a release manifest, a flags
# snapshot) is a few tens of KiB; anything larger from a cell is abuse or a bug.
MAX_BODY_BYTES = 256 * 1024
_MAX_REASON = 1000
# How often a consumer the broker cancelled (its queue was deleted) looks for the queue again.
CONSUMER_RETRY_SECONDS = 1.0
# A delivery whose handler failed is handed back after this pause, doubled at each failure
# after the first and capped: with the delivery limit of 5, 1 + 2 + 4 + 8 = 15 s pass before a
# message that keeps failing is dead-lettered, long enough to ride out a Redis failover.
HANDLER_RETRY_SECONDS = 1.0
HANDLER_RETRY_CAP_SECONDS = 30.0
# Failed deliveries a consumer of a classic queue keeps count of: its prefetch's worth, unless
# deliveries it handed back were settled by another consumer and so never forgotten here.
MAX_COUNTED_FAILURES = 1024


class _Delivered:
    """A delivery as the broker sent it, its properties read when asked.

    aio-pika's consumer decodes every property into an IncomingMessage up front and runs a
    second task per delivery, a large share of the registry's cost per heartbeat
    (bench/RESULTS.md); the bus reads a few properties, most of them only when something goes
    wrong.
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
    deliveries skip aio-pika's message object (see ``_Delivered``). It is issued again when the
    robust channel reopens and when the broker cancels it (``Consumers._keep_consuming``)."""

    channel: AbstractRobustChannel
    queue: str
    callback: Callable[[DeliveredMessage], Coroutine[Any, Any, None]]
    underlay: aiormq.Channel | None = None
    tag: str | None = None
    # A reopen and a cancel may both reissue it: one at a time, or it would consume twice.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Waiting for its queue to come back (``_recover``), if it is.
    recovering: asyncio.Task[None] | None = None


class Consumers:
    """Every consumer of one bus: a channel each, with its acks batched."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        *,
        publisher: Publisher,
        queues: Queues,
        metrics: BusMetrics,
        stopping: Stopping,
        retry_seconds: float,
    ) -> None:
        self._conn = connection
        self._publisher = publisher
        self._queues = queues
        self._metrics = metrics
        self._stopping = stopping
        self.retry_seconds = retry_seconds
        self._consumers: list[_Consumer] = []
        # One acker per underlying channel: tags restart when a channel is reopened.
        self._ackers: dict[int, BatchedAcks] = {}

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
        """Consume ``queue`` with ``routes``. The queue must exist (the control plane declares
        it); it is obtained with a passive declare on a robust channel, so the channel checks
        it again whenever it reopens (a queue obtained otherwise is not restored after a
        reconnect: aio-pika issue 594)."""
        by_type: dict[str, tuple[type[Message], Handler]] = {}
        for model, handler in routes_for(routes).items():
            assert issubclass(model, Message), f"{model.__name__} is not a message"
            by_type[model.wire_name] = (model, handler)
        channel = await self._conn.channel()
        assert isinstance(channel, aio_pika.RobustChannel)
        await channel.set_qos(prefetch_count=prefetch)
        await channel.declare_queue(queue, passive=True)
        handling = _Routes(queue, by_type, delivery_limit, max_body_bytes, reject_to_dead)
        consumer = _Consumer(channel, queue, partial(self._on_delivery, handling))
        await self._start(consumer)
        channel.reopen_callbacks.add(partial(self._restart, consumer))
        self._consumers.append(consumer)
        log.info("consuming %s (%s)", queue, ", ".join(sorted(by_type)))

    # -- keeping consumers issued --------------------------------------------------------------

    async def _start(self, consumer: _Consumer) -> None:
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

    async def _restart(self, consumer: _Consumer, *_: Any) -> None:
        # The robust channel reopened (a reconnect, or the channel closed on an error) and
        # restored its qos and the passive declare; the consumer is ours to reissue.
        if self._stopping.stopping:
            return
        try:
            await self._start(consumer)
            log.info("consuming %s again after its channel reopened", consumer.queue)
        except Exception as exc:
            log.warning("could not consume %s after a reopen: %r", consumer.queue, exc)
            self._keep_consuming(consumer)

    def _on_cancelled(self, consumer: _Consumer, frame: Any) -> None:
        if self._stopping.stopping or frame.consumer_tag != consumer.tag:
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
        while not self._stopping.stopping:
            try:
                if await self._queues.exists(consumer.queue):
                    await self._start(consumer)
                    log.info("consuming %s again", consumer.queue)
                    return
            except Exception as exc:
                log.warning("could not consume %s yet: %r", consumer.queue, exc)
            await asyncio.sleep(CONSUMER_RETRY_SECONDS)

    # -- one delivery --------------------------------------------------------------------------

    async def _on_delivery(self, routes: _Routes, delivered: DeliveredMessage) -> None:
        message = _Delivered(delivered)
        started = time.perf_counter()
        self._stopping.handling()
        outcome = "acked"
        try:
            outcome = await self._handle(routes, message)
        except Exception:
            # Acking, nacking or dead-lettering failed (the channel went away): the broker
            # redelivers whatever was not acked, which is the behaviour we want.
            log.exception("could not settle a delivery from %s", routes.queue)
            outcome = "unsettled"
        finally:
            self._metrics.count_consumed(routes.queue, outcome, time.perf_counter() - started)
            self._stopping.handled()

    async def _handle(self, routes: _Routes, message: _Delivered) -> str:
        queue, max_body_bytes = routes.queue, routes.max_body_bytes
        if self._stopping.stopping:
            # Shutting down: hand it back to the queue for another replica or our next start.
            await self._nack(message)
            return "requeued"
        if len(message.body) > max_body_bytes:
            return await self._dead(
                routes,
                message,
                f"body of {len(message.body)} bytes exceeds {max_body_bytes}",
                keep_bytes=KEPT_OF_OVERSIZED_BODY,
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
        except TryAgain as exc:
            attempts = failures + 1
            if attempts >= routes.delivery_limit:
                return await self._dead(routes, message, f"lost {attempts} races, last: {exc}")
            log.info("handler for %s lost a race (attempt %d); trying again", queue, attempts)
            routes.failed(message, attempts)
            await self._nack(message)
            return "retried"
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
        self._acker(message).ack(message.delivery_tag)
        return "acked"

    async def _retry_later(
        self, routes: _Routes, message: _Delivered, attempts: int, why: str
    ) -> str:
        """Hand a delivery back to its queue after a pause that doubles with its failures."""
        pause = min(self.retry_seconds * 2.0 ** (attempts - 1), HANDLER_RETRY_CAP_SECONDS)
        log.warning("%s (attempt %d); retrying in %.1fs", why, attempts, pause)
        # Held (unacked) through the pause: a failure that lasts (Redis down) fills the
        # prefetch and slows consuming instead of spending the delivery limit in a few ms.
        await self._stopping.pause(pause)
        routes.failed(message, attempts)
        await self._nack(message)
        return "retried"

    async def _dead(
        self, routes: _Routes, message: _Delivered, reason: str, keep_bytes: int | None = None
    ) -> str:
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
        body = message.body
        headers = dict(message.headers)
        if keep_bytes is not None and len(body) > keep_bytes:
            # The reason is what an operator needs; a copy of an oversized body per consuming
            # service is what a cell flooding them would fill the broker's storage with.
            body = body[:keep_bytes]
            headers[ORIGINAL_BYTES_HEADER] = len(message.body)
        headers.update(
            {
                DEAD_REASON_HEADER: reason,
                "x-substrate-original-queue": queue,
                "x-substrate-original-routing-key": message.routing_key,
                "x-substrate-original-user-id": message.user_id or "",
            }
        )
        dead = aio_pika.Message(
            body,
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            type=message.type,
            message_id=message.message_id,
            timestamp=datetime.now(UTC),
            user_id=self._publisher.user,
            headers=headers,
        )
        try:
            await self._publisher.publish_raw(
                dead, DLX_EXCHANGE, dead_letter_name(queue), mandatory=True
            )
        except BusError as exc:
            # Not moved (its dead letter queue deleted, the broker refusing): handed back to be
            # tried again. Held unsettled it would hold back the acks of every later delivery
            # on this channel until the prefetch filled and consuming stopped.
            why = f"could not dead-letter a message from {queue}: {exc!r}"
            return await self._retry_later(routes, message, routes.failures_of(message) + 1, why)
        routes.settled(message)
        self._acker(message).ack(message.delivery_tag)
        return "dead_lettered"

    # -- settling ------------------------------------------------------------------------------

    def _acker(self, message: _Delivered) -> BatchedAcks:
        channel = message.channel
        acker = self._ackers.get(id(channel))
        if acker is None or acker.channel is not channel:
            acker = self._ackers[id(channel)] = BatchedAcks(channel)
        return acker

    async def _nack(self, message: _Delivered) -> None:
        await message.channel.basic_nack(message.delivery_tag, requeue=True)
        self._acker(message).settled_otherwise(message.delivery_tag)

    # -- stopping ------------------------------------------------------------------------------

    async def cancel(self) -> None:
        """Cancel every consumer (the stop has begun: none is issued again)."""
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

    async def send_acks(self) -> None:
        """Send the acks still batched."""
        for acker in list(self._ackers.values()):
            await acker.drain()
