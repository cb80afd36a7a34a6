"""A transactional outbox in Redis.

A service writes an event to its outbox list in the same atomic step (a Lua script or a
MULTI) as the state change the event describes; the relay publishes it with confirms and only
then removes it. A crash between the state write and the publish therefore delays the event
instead of losing it (RELIABILITY 4); the price is a possible duplicate, which consumers
tolerate by ``message_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from prometheus_client import Counter

from common.bus.errors import BusError, Unroutable
from common.crashpoints import crash_point
from common.messages import COMMANDS_EXCHANGE, MESSAGES, Message

if TYPE_CHECKING:
    # Only the relay, started by a bootstrap, holds a bus: the stores that write the outbox
    # (and the handlers that call them) stay clear of the messaging library.
    from common.bus.rabbit_bus import RabbitBus

log = logging.getLogger(__name__)

# Entries a relay publishes at once (their confirms awaited together).
BATCH = 100
# The newest commands kept per outbox when their cell's queue was missing.
UNROUTABLE_KEPT = 1000
UNROUTABLE_COMMANDS = Counter(
    "substrate_outbox_unroutable_commands",
    "Commands to a cell whose command queue was missing (kept, see <outbox>:unroutable)",
    ["type"],
)


def outbox_entry(event: Message) -> str:
    """The serialized form a Lua script or a pipeline pushes onto the outbox list: an event, or
    a command to a cell (published to its queue the same way)."""
    return json.dumps(
        {"id": uuid.uuid4().hex, "type": event.wire_name, "body": event.model_dump_json()}
    )


class Outbox:
    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self._redis = redis
        self.key = key
        # Shared by replicas: one that starts moves everything here back to the list, so an
        # entry a crashed replica held is published again (perhaps twice, never not at all).
        self.inflight_key = f"{key}:inflight"
        self.unroutable_key = f"{key}:unroutable"
        self._unheard: set[str] = set()

    async def put(self, message: Message) -> None:
        await self._redis.rpush(self.key, outbox_entry(message))

    async def pending(self) -> int:
        return int(await self._redis.llen(self.key)) + int(
            await self._redis.llen(self.inflight_key)
        )

    async def recover(self) -> int:
        moved = 0
        while await self._redis.lmove(self.inflight_key, self.key, "RIGHT", "LEFT") is not None:
            moved += 1
        if moved:
            log.info("re-queued %d outbox entries left in flight by a previous run", moved)
        return moved

    async def publish_batch(self, bus: RabbitBus, timeout: int = 1, limit: int = BATCH) -> int:
        """Publish up to ``limit`` of the oldest entries, waiting up to ``timeout`` for the
        first; how many were taken.

        One publish at a time, each waiting for its confirm, made a rollout to 10,000 cells
        wait on 10,000 round trips to the broker. The batch's confirms are awaited together;
        entries for the same exchange and routing key (one cell's commands, one kind of
        event) are still published one after the other, in order. Entries whose publish
        failed go back to the head of the list in their order, and the error is raised."""
        first = await self._redis.blmove(self.key, self.inflight_key, timeout, "LEFT", "RIGHT")
        if first is None:
            return 0
        raws = [str(first)]
        if limit > 1:
            pipe = self._redis.pipeline(transaction=False)
            for _ in range(limit - 1):
                pipe.lmove(self.key, self.inflight_key, "LEFT", "RIGHT")
            raws += [str(raw) for raw in await pipe.execute() if raw is not None]
        by_destination: dict[tuple[str, str], list[tuple[str, dict[str, str], Message]]] = {}
        for raw in raws:
            entry = json.loads(raw)
            event = MESSAGES[entry["type"]].model_validate_json(entry["body"])
            destination = (event.exchange, event.routing_key())
            by_destination.setdefault(destination, []).append((raw, entry, event))
        done: list[str] = []
        failed: set[str] = set()
        errors: list[BusError] = []

        async def in_order(items: list[tuple[str, dict[str, str], Message]]) -> None:
            for n, (raw, entry, event) in enumerate(items):
                try:
                    if await self._publish(bus, raw, entry, event):
                        done.append(raw)
                except BusError as exc:
                    # What follows it for the same destination waits too: order is kept.
                    failed.update(r for r, _, _ in items[n:])
                    errors.append(exc)
                    return

        await asyncio.gather(*(in_order(items) for items in by_destination.values()))
        # The batch leaves the in-flight list in one round trip, not one per entry. A crash
        # before it publishes the batch again on restart: duplicates, which consumers drop;
        # nothing lost.
        again = [raw for raw in raws if raw in failed]
        if done or again:
            pipe = self._redis.pipeline(transaction=True)
            for raw in (*done, *again):
                pipe.lrem(self.inflight_key, 1, raw)
            if again:
                pipe.lpush(self.key, *reversed(again))
            await pipe.execute()
        if failed:
            raise errors[0]
        return len(raws)

    async def _publish(
        self, bus: RabbitBus, raw: str, entry: dict[str, str], event: Message
    ) -> bool:
        """Publish one entry; whether it is done with (False: kept aside, off the list)."""
        crash_point("outbox.before-publish", entry["type"])
        try:
            await bus.publish(event, message_id=entry["id"])
        except Unroutable:
            if event.exchange == COMMANDS_EXCHANGE:
                # A command for a cell whose queue is missing: detected and kept for the
                # operator, never silently dropped. The cell's desired state stays in the
                # service's store; the cell gets it again on its next sync once its queue is
                # back (the registry declares it again when the cell registers).
                await self._park(raw, entry, event)
                return False
            # No queue subscribes to this event: there is nobody to tell, and keeping it would
            # block every event behind it.
            if entry["type"] not in self._unheard:
                # Once per type and process: an event with no listener is not an error.
                self._unheard.add(entry["type"])
                log.info("outbox %s: nobody listens for %s yet; dropped", self.key, entry["type"])
            return True
        crash_point("outbox.after-publish", entry["type"])
        return True

    async def _park(self, raw: str, entry: dict[str, str], event: Message) -> None:
        UNROUTABLE_COMMANDS.labels(entry["type"]).inc()
        log.warning(
            "outbox %s: %s for %s is unroutable (the cell's command queue is missing); kept in %s",
            self.key,
            entry["type"],
            event.routing_key(),
            self.unroutable_key,
        )
        pipe = self._redis.pipeline(transaction=True)
        pipe.lpush(self.unroutable_key, raw)
        pipe.ltrim(self.unroutable_key, 0, UNROUTABLE_KEPT - 1)
        pipe.lrem(self.inflight_key, 1, raw)
        await pipe.execute()

    async def unroutable(self) -> list[Message]:
        """Commands kept because their cell's queue was missing, newest first."""
        raw = await self._redis.lrange(self.unroutable_key, 0, -1)
        entries = [json.loads(r) for r in raw]
        return [MESSAGES[e["type"]].model_validate_json(e["body"]) for e in entries]

    async def relay(self, bus: RabbitBus, stop: asyncio.Event) -> None:
        """Publish entries until ``stop`` is set."""
        await self.recover()
        delay = 0.1
        while not stop.is_set():
            try:
                await self.publish_batch(bus)
                delay = 0.1
            except BusError as exc:
                log.warning(
                    "outbox %s: publish failed (%s); retrying in %.1fs", self.key, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
