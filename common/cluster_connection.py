"""A robust aio-pika connection over the nodes of a RabbitMQ cluster.

aio-pika's ``RobustConnection`` reconnects to the one URL it was given; a client of a cluster
whose node dies must go to another node. ``ClusterConnection`` keeps every node's URL and gives
each connection attempt the next one in turn, starting at a random node so a fleet's
connections spread over the cluster. Everything else (restoring channels, consumers and
reconnect callbacks) is aio-pika's own.
"""

from __future__ import annotations

import random
from typing import Any

from aio_pika import RobustConnection
from aio_pika.abc import UnderlayConnection
from yarl import URL


class ClusterConnection(RobustConnection):
    def __init__(self, urls: list[str], first_node: int | None = None, **kwargs: Any) -> None:
        self._urls = [URL(url) for url in urls]
        first = random.randrange(len(urls)) if first_node is None else first_node % len(urls)
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
