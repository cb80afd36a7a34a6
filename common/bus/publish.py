"""Publishing: persistent, confirmed, mandatory, signed with the sender's user id, bounded in
time.

A publish returns once the broker has the message on disk (publisher confirms); a message no
queue takes raises ``Unroutable`` instead of vanishing (``mandatory``, with aio-pika's returns
raised: its default hands a returned message back as a value); a broker that does not confirm
in time (a memory or disk alarm blocks publishers) raises ``PublishTimeout`` instead of hanging.
Such a message may still arrive after the alarm clears, which is one reason every handler is
idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, DeliveryMode

from common import crashpoints
from common.bus.deadlines import Deadlines
from common.bus.errors import (
    NotConnected,
    PublishNacked,
    PublishRefused,
    PublishTimeout,
    Unroutable,
)
from common.bus.shutdown import Stopping
from common.messages import Message
from common.metrics import BusMetrics

log = logging.getLogger(__name__)

PERSISTENT = int(DeliveryMode.PERSISTENT)


class Publisher:
    """One confirming channel that every publish of a bus goes through."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        *,
        user: str,
        timeout: float,
        metrics: BusMetrics,
        stopping: Stopping,
    ) -> None:
        self._conn = connection
        self.channel = channel
        self.user = user
        self.deadlines = Deadlines(timeout)
        self.metrics = metrics
        self._stopping = stopping
        self._renew_lock = asyncio.Lock()

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, **kwargs: Any) -> Publisher:
        return cls(connection, await _confirming_channel(connection), **kwargs)

    @property
    def connected(self) -> bool:
        return not self._conn.is_closed and self._conn.connected.is_set()

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
        body: bytes | None = None,
    ) -> None:
        """Publish ``message`` as its JSON body, with the contract's properties, and wait for
        the broker's confirm. The exchange and routing key default to the message's own.
        ``body``: the message's JSON, when the caller encoded it already."""
        # The frame's properties built directly: aio-pika's Message, and the properties it
        # builds again from itself on each publish, were a fifth of a confirmed publish's CPU.
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_type=message.wire_name,
            message_id=message_id or uuid.uuid4().hex,
            timestamp=datetime.now(UTC),
            user_id=user_id or self.user,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=None if expiration is None else str(int(expiration * 1000)),
            headers=headers,
        )
        await self._send(
            message.model_dump_json().encode() if body is None else body,
            properties,
            message.exchange if exchange is None else exchange,
            message.routing_key() if routing_key is None else routing_key,
            mandatory=mandatory,
            timeout=confirm_timeout,
        )

    async def publish_raw(
        self,
        message: aio_pika.Message,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool,
        timeout: float | None = None,
    ) -> None:
        """Publish an AMQP message as it is (a dead letter keeps the original's body and
        properties) and wait for the confirm."""
        await self._send(
            message.body,
            message.properties,
            exchange,
            routing_key,
            mandatory=mandatory,
            timeout=timeout,
        )

    async def _send(
        self,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool,
        timeout: float | None,
    ) -> None:
        outcome = "error"
        channel = self.channel
        kind = properties.message_type or ""
        try:
            if channel.is_closed and self.connected and not self._stopping.stopping:
                # After a reconnect the channels reopen one at a time, a consumer's perhaps
                # before this one: a handler's reply (or a dead letter) would fail here and its
                # delivery spend a try of its limit. With the connection up, the channel is
                # moments away: wait for it.
                await self._reopened(channel, timeout)
            if channel.is_closed or not self.connected:
                raise NotConnected(
                    f"cannot publish {_what(kind, exchange, routing_key)}: "
                    "not connected to the broker"
                )
            try:
                async with self.deadlines.guard(timeout):
                    underlay = await channel.get_underlay_channel()
                    for _ in range(2 if crashpoints.DUPLICATES else 1):
                        await underlay.basic_publish(
                            body,
                            exchange=exchange,
                            routing_key=routing_key,
                            properties=properties,
                            mandatory=mandatory,
                        )
            except TimeoutError:
                outcome = "timeout"
                raise PublishTimeout(
                    f"broker did not confirm {_what(kind, exchange, routing_key)} within "
                    f"{self.deadlines.seconds if timeout is None else timeout}s (is it blocked "
                    "by a memory or disk alarm?)"
                ) from None
            except aio_pika.exceptions.PublishError:
                outcome = "unroutable"
                what = _what(kind, exchange, routing_key)
                raise Unroutable(f"{what} is unroutable: no queue is bound for it") from None
            except aio_pika.exceptions.DeliveryError as exc:
                outcome = "refused"
                what = _what(kind, exchange, routing_key)
                await self._renew(channel)
                raise PublishNacked(f"broker refused {what}: {exc}") from None
            except aiormq.exceptions.ChannelInvalidStateError as exc:
                what = _what(kind, exchange, routing_key)
                raise NotConnected(f"cannot publish {what}: {exc}") from exc
            except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
                # The broker closes the channel for a forged user_id or a missing permission.
                outcome = "refused"
                what = _what(kind, exchange, routing_key)
                raise PublishRefused(f"broker refused {what}: {exc}") from None
            outcome = "confirmed"
        finally:
            self.metrics.count_published(kind, outcome)

    async def _renew(self, nacked: AbstractRobustChannel) -> None:
        """Publish on a new channel from now on.

        Seen on a RabbitMQ 3.10 cluster: a channel whose first publish to a quorum queue lands
        while the queue elects a new leader (a client that reconnected to another node within
        milliseconds of losing its own) has every later publish nacked, for as long as the
        channel lives. A nack is rare otherwise (a queue refusing publishes when full), and a new
        channel costs one round trip. Direct reply-to is consumed on the publishing channel, so
        the RPC client consumes it again on the new one (``rpc.RpcClient``).
        """
        async with self._renew_lock:
            if self.channel is not nacked or not self.connected:
                return
            self.channel = await _confirming_channel(self._conn)
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
                    async with self.deadlines.guard(timeout):
                        await reopened.wait()
        finally:
            channel.reopen_callbacks.discard(on_reopen)


async def _confirming_channel(connection: AbstractRobustConnection) -> AbstractRobustChannel:
    # on_return_raises: aio-pika's default returns an unroutable message as a value.
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    assert isinstance(channel, aio_pika.RobustChannel)
    return channel


def _what(kind: str, exchange: str, routing_key: str) -> str:
    return f"{kind or 'a message'} to {exchange or '(default)'}/{routing_key}"
