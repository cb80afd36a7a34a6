"""The connection to the broker: one URL or a cluster's nodes, the first connection retried
with backoff, reconnects after that.

aio-pika's robust connection restores channels after a reconnect, but only for a connection
that once succeeded (``connect_robust`` fails fast): a broker that is not up yet when a process
starts would otherwise be a crash, so ``open_connection`` retries it, saying what it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import ssl
import time
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import UnderlayConnection
from yarl import URL

from common import broker_urls
from common.bus.errors import NotConnected

log = logging.getLogger(__name__)


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


def broker_problem(exc: BaseException, where: str) -> str:
    """What went wrong connecting to the broker at ``where``, in words (not a library's repr)."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return f"the broker at {where} refused the user name or password"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # The broker closes the connection at Connection.Open: the URL's virtual host does
        # not exist, or the user may not use it.
        return f"the broker at {where} refused the virtual host (none such, or not this user's)"
    if exc.args and exc.args[0] == errno.ECONNREFUSED:
        return f"nothing listens at {where} (connection refused): is RabbitMQ running?"
    if _unresolved(exc):
        return f"the broker's host in {where} does not resolve"
    if isinstance(exc, TimeoutError):
        return f"the broker at {where} did not answer in time"
    reason = exc.args[-1] if exc.args else type(exc).__name__
    return f"cannot connect to the broker at {where}: {reason}"


# getaddrinfo's answers for a name that does not resolve (aiormq passes its code on as args[0]).
_UNRESOLVED = {
    socket.EAI_NONAME,
    socket.EAI_AGAIN,
    getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
}


def _unresolved(exc: BaseException) -> bool:
    return bool(exc.args) and exc.args[0] in _UNRESOLVED


# Refusals that another attempt will not change: a caller that cannot fix them by waiting (the
# CLI) fails at once.
PERMANENT = (aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.InvalidFrameError)


async def open_connection(
    url: str,
    *,
    name: str,
    give_up_after: float | None,
    max_backoff: float,
    ssl_context: ssl.SSLContext | None,
    fail_fast: bool = False,
) -> ClusterConnection:
    """Connect, retrying the first connection with backoff.

    ``url`` is one broker URL or the comma-separated URLs of a cluster's nodes; each attempt
    goes to the next node, and so does every reconnect after a node is lost. A connection
    starts at a random node, so a fleet's connections spread. ``give_up_after`` (seconds)
    bounds the wait: NotConnected after it, and ``fail_fast`` gives up at once on a refusal
    that waiting does not change (credentials, virtual host).
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
        left = None if give_up_after is None else give_up_after - (time.monotonic() - started)
        try:
            await connection.connect(timeout=10 if left is None else max(min(10, left), 0.5))
            return connection
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
            waited = time.monotonic() - started
            # Closed here, not left to the collector (which warns of a close never awaited).
            with contextlib.suppress(Exception):
                await connection.close()
            permanent = fail_fast and (isinstance(exc, PERMANENT) or _unresolved(exc))
            if permanent or (give_up_after is not None and waited + delay > give_up_after):
                problem = broker_problem(exc, broker_urls.redact(url))
                after = "" if permanent else f" (gave up after {waited:.1f}s)"
                raise NotConnected(problem + after) from exc
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
