"""Request/reply over ``substrate.rpc``: the server side (``serve``) and the client
(``RpcClient``).

Replies come back on RabbitMQ's direct reply-to, so a caller needs no queue of its own and
many requests can be in flight per connection. A request carries a TTL equal to its timeout:
a service that starts late does not act on requests nobody waits for any more.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from common.audit import Forbidden, Guard
from common.bus.consume import Consumers
from common.bus.errors import (
    BusError,
    NotConnected,
    PublishNacked,
    Refused,
    RemoteError,
    RequestTimeout,
    RpcFailure,
    ServiceUnavailable,
    Unroutable,
    validation_summary,
)
from common.bus.publish import Publisher
from common.messages import Delivery, RpcErrorBody, RpcReply, RpcRequest, rpc_queue
from common.requests import Request
from common.routes import Handler, Route, routes_for
from common.vocabulary import Role

log = logging.getLogger(__name__)

R = TypeVar("R")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# A read the broker nacked is sent again after this long, until its timeout.
NACKED_RETRY_SECONDS = 0.25


async def serve(
    consumers: Consumers,
    publisher: Publisher,
    service: str,
    routes: Sequence[Route],
    *,
    before_reply: Callable[[], Awaitable[None]] | None = None,
    guard: Guard | None = None,
) -> None:
    """Answer requests to ``service``: each route's model is a Request, validated from the
    envelope's params; the handler's result is its response. RpcFailure and ValidationError
    become error replies the caller raises. ``before_reply`` runs after a handler succeeded
    and before its answer goes out (e.g. waiting for Redis replicas); an RpcFailure from it is
    the answer instead. ``guard`` refuses a sender whose role may not make the request, and
    audits each write and each refusal before the answer goes out (``audit.list`` reads it)."""
    methods: dict[str, tuple[type[Request[Any]], Handler]] = {}
    if guard is not None:
        routes = [*routes, *guard.routes()]
    for model, handler in routes_for(routes).items():
        assert issubclass(model, Request), f"{model.__name__} is not a request"
        methods[model.method] = (model, handler)

    async def on_request(request: RpcRequest, delivery: Delivery) -> None:
        if not delivery.reply_to:
            raise Refused("request without reply_to")
        found = methods.get(request.method)
        role: Role | None = None
        body: bytes | None = None
        try:
            if found is None:
                raise RpcFailure(
                    "unknown_method",
                    f"{service} has no method {request.method!r} "
                    f"(it has: {', '.join(sorted(methods))})",
                )
            model, handler = found
            if guard is not None:
                role = await guard.admit(model, delivery)
            result = await handler(model.model_validate(request.params), delivery)
            if before_reply is not None:
                await before_reply()
            # As any: a response may be a subclass of the declared one (each service's
            # status), and its own fields are part of the answer. Encoded once, straight to
            # JSON: a page of 5,000 cells went through Python data and back before.
            answer = model.response.dump_json(result, serialize_as_any=True)
            reply = RpcReply(ok=True)
            body = b'{"ok":true,"result":' + answer + b',"error":null}'
        except Forbidden as exc:
            role = exc.role
            reply = RpcReply(ok=False, error=RpcErrorBody(code="forbidden", message=str(exc)))
        except RpcFailure as exc:
            reply = RpcReply(ok=False, error=RpcErrorBody(code=exc.code, message=exc.message))
        except ValidationError as exc:
            reply = RpcReply(
                ok=False, error=RpcErrorBody(code="invalid", message=validation_summary(exc))
            )
        except Exception as exc:
            log.exception("%s.%s failed", service, request.method)
            reply = RpcReply(
                ok=False,
                error=RpcErrorBody(code="internal", message=f"{type(exc).__name__}: {exc}"),
            )
        if guard is not None and found is not None:
            await _audit(guard, found[0], request, delivery, role=role, reply=reply)
        # Not mandatory: a caller that gave up has no reply queue any more, and that is not
        # an error of this service.
        await publisher.publish(
            reply,
            routing_key=delivery.reply_to,
            correlation_id=delivery.correlation_id,
            mandatory=False,
            body=body if reply.ok else None,
        )

    await consumers.consume(rpc_queue(service), [Route(RpcRequest, on_request)])


async def _audit(
    guard: Guard,
    model: type[Request[Any]],
    request: RpcRequest,
    delivery: Delivery,
    *,
    role: Role | None,
    reply: RpcReply,
) -> None:
    """A write, and any refused request, goes into the service's audit log."""
    error = reply.error
    if error is not None and error.code == "forbidden":
        await guard.record(
            model.method, request.params, delivery, role, result="refused", detail=error.message
        )
    elif not model.read_only:
        detail = f"{error.code}: {error.message}" if error is not None else ""
        await guard.record(
            model.method,
            request.params,
            delivery,
            role,
            result="ok" if reply.ok else "failed",
            detail=detail,
        )


class RpcClient:
    """Requests from this bus, their replies matched by correlation id."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        # A reply's body, validated by whoever waits for it: ``call`` reads it straight into
        # its response type (a page of 5,000 cells went through Python data first before).
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        # The channel direct reply-to is consumed on: it must be the one that publishes the
        # requests, which changes when the publisher moves to a new channel after a nack
        # (replies due on the old one are lost, and their requests time out).
        self._replies_on: AbstractChannel | None = None
        # Held here: aio-pika holds queue objects weakly (aio-pika issue 594), and a collected
        # one is not restored after a reconnect.
        self._replies: AbstractQueue | None = None
        self._lock = asyncio.Lock()

    async def _consume_replies(self) -> None:
        async with self._lock:
            channel = self._publisher.channel
            if self._replies_on is channel:
                return
            # A passive declare keeps it in the robust channel's restore list.
            queue = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
            await queue.consume(self._on_reply, no_ack=True)
            self._replies, self._replies_on = queue, channel

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply that arrived after its request timed out
        future.set_result(message.body)

    async def _exchange(
        self, service: str, method: str, params: Mapping[str, Any], timeout: float
    ) -> bytes:
        """Send a request and wait for its reply's body."""
        await self._consume_replies()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            request = RpcRequest(service=service, method=method, params=dict(params))
            try:
                await self._publisher.publish(
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
                    return await future
            except TimeoutError:
                raise RequestTimeout(
                    f"service {service!r} did not answer {method!r} within {timeout:g}s "
                    "(is it running?)"
                ) from None
        finally:
            self._pending.pop(correlation_id, None)

    async def request(
        self,
        service: str,
        method: str,
        params: BaseModel | Mapping[str, Any] | None = None,
        *,
        timeout: float = 5.0,
    ) -> Any:
        """Call ``method`` on ``service`` and return its result, untyped (``call`` is the
        typed way). Raises RequestTimeout (naming the service) when nobody answers in time,
        and RemoteError when the service answers with an error."""
        if isinstance(params, BaseModel):
            params = params.model_dump(mode="json")
        body = await self._exchange(service, method, params or {}, timeout)
        return _untyped(service, body).result

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
        params = request.model_dump(mode="json")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                body = await self._exchange(
                    to, request.method, params, max(deadline - loop.time(), 0.1)
                )
                break
            except PublishNacked:
                if not request.read_only or loop.time() + NACKED_RETRY_SECONDS >= deadline:
                    raise
                log.info("%s.%s nacked by the broker; asking again", to, request.method)
                await asyncio.sleep(NACKED_RETRY_SECONDS)
        try:
            reply = _typed_reply(type(request)).validate_json(body)
        except ValidationError as exc:
            # Said as the untyped reading says it: a malformed envelope, an error answer, or
            # else a result that is not the response type.
            _untyped(to, body)
            raise BusError(
                f"{to} answered {request.method!r} with an unexpected result: "
                f"{validation_summary(exc, under='result')}"
            ) from None
        if not reply.ok:
            _untyped(to, body)  # raises its RemoteError
        answer: R = reply.result
        return answer

    def close(self) -> None:
        """Fail the requests still waiting for a reply."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected("bus closed"))


def _untyped(service: str, body: bytes) -> RpcReply:
    """A reply's envelope, its result as plain data; an error answer raises RemoteError."""
    try:
        reply = RpcReply.model_validate_json(body)
    except ValidationError as exc:
        raise BusError(f"malformed reply: {validation_summary(exc)}") from None
    if not reply.ok:
        error = reply.error or RpcErrorBody(code="internal", message="error without detail")
        raise RemoteError(service, error.code, error.message)
    return reply


class _Reply(BaseModel, Generic[R]):
    """A reply whose result is read straight into the request's response type."""

    model_config = ConfigDict(extra="ignore")

    ok: bool
    # Required: an error reply's null result fails here, and is read as an error.
    result: R
    error: RpcErrorBody | None = None


@functools.cache
def _typed_reply(model: type[Request[Any]]) -> TypeAdapter[_Reply[Any]]:
    generic: Any = _Reply  # parametrized by a value, which a type checker cannot follow
    return TypeAdapter(generic[model.response_type])
