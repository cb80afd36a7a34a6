"""Each cell's broker user, permissions, limits and command queue, made and removed through
the management API and the bus. Kept out of the broker's boot-time definitions on purpose:
the broker re-applies those on every boot and would overwrite runtime changes."""

from __future__ import annotations

import asyncio
import logging
import time

from common.bus.rabbit_bus import RabbitBus
from common.messages import command_queue
from common.rabbitmq_api import RabbitApi
from common.topology import POLICIES, CellQueues, Topology, cell_commands
from services.registry.model import CELL_MAX_CHANNELS, CELL_MAX_CONNECTIONS, broker_grant

log = logging.getLogger(__name__)

# `status` shows the broker's socket limit; reading it must not make the registry look down when
# the management API is slow (its client waits 10 s, an operator's request 5 s), and a limit
# changes only when a node restarts.
SOCKET_LIMIT_WAIT_SECONDS = 2.0
SOCKET_LIMIT_TTL_SECONDS = 30.0


class CellBroker:
    def __init__(
        self,
        api: RabbitApi,
        bus: RabbitBus,
        vhost: str,
        *,
        queues: CellQueues = "classic",
        socket_limit_wait: float = SOCKET_LIMIT_WAIT_SECONDS,
    ) -> None:
        self.api = api
        self.bus = bus
        self.vhost = vhost
        self.queues = queues
        self.socket_limit_wait = socket_limit_wait
        # (when read, monotonic; the limit read)
        self._socket_limit: tuple[float, int] | None = None

    async def ensure_policies(self) -> None:
        """The policies that bound every queue's storage (common/topology.py); putting the
        same one again changes nothing."""
        for policy in POLICIES:
            await self.api.put_policy(self.vhost, policy.name, policy.pattern, policy.definition)

    async def provision(self, cell_id: str, password: str) -> None:
        """User, permissions, topic permissions, limits, command queue. The caller undoes a
        partial provision with ``deprovision``."""
        grant = broker_grant(cell_id)
        await self.api.put_user(cell_id, password)
        await self.api.set_permissions(
            self.vhost, cell_id, configure=grant.configure, write=grant.write, read=grant.read
        )
        await self.api.set_topic_permissions(
            self.vhost,
            cell_id,
            exchange=grant.topic_exchange,
            write=grant.topic_write,
            read=grant.topic_read,
        )
        await self.api.set_user_limit(cell_id, "max-connections", CELL_MAX_CONNECTIONS)
        await self.api.set_user_limit(cell_id, "max-channels", CELL_MAX_CHANNELS)
        await self.bus.declare(self._commands(cell_id))

    def _commands(self, cell_id: str) -> Topology:
        return cell_commands(cell_id, queues=self.queues)

    def queue_fingerprint(self, cell_id: str) -> str:
        """What ``provision`` and ``ensure_queue`` declare for the cell, as a fingerprint."""
        return self._commands(cell_id).fingerprint()

    async def queue_exists(self, cell_id: str) -> bool:
        return await self.bus.queue_exists(command_queue(cell_id))

    async def ensure_queue(self, cell_id: str) -> None:
        """Declare the command queue and its bindings again (a no-op where they exist)."""
        await self.bus.declare(self._commands(cell_id))

    async def deprovision(self, cell_id: str) -> None:
        """Delete the user (the broker closes its connections) and the command queue."""
        await self.api.delete_user(cell_id)
        await self.bus.delete_queue(command_queue(cell_id))

    async def set_password(self, cell_id: str, password: str) -> None:
        await self.api.put_user(cell_id, password)

    async def close_connections(self, cell_id: str, reason: str) -> int:
        """Close every connection of the cell's user, one opened a moment ago included."""
        return await self.api.close_user_connections(cell_id, reason)

    async def socket_limit(self) -> int | None:
        """How many sockets the broker accepts (its open-files limit leaves room for about that
        many connections), summed over a cluster's nodes; None if the API does not say (a
        node just started, or a user without the monitoring tag). Read at most every
        SOCKET_LIMIT_TTL_SECONDS; an answer slower than ``socket_limit_wait`` gives the last
        one read."""
        now, last = time.monotonic(), self._socket_limit
        if last is not None and now - last[0] < SOCKET_LIMIT_TTL_SECONDS:
            return last[1]
        try:
            async with asyncio.timeout(self.socket_limit_wait):
                nodes = await self.api.call("GET", "/nodes")
        except Exception as exc:
            log.debug("could not read the broker's socket limit: %r", exc)
            return last[1] if last is not None else None
        limits = [int(n["sockets_total"]) for n in nodes if n.get("sockets_total")]
        if not limits:
            return None
        self._socket_limit = (now, limit := sum(limits))
        return limit
