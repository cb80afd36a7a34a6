"""The Lua scripts every store uses, loaded by name from the ``.lua`` files beside this module,
and :class:`Change`, the one way a store writes atomically.

A script here makes a write atomic; it never decides. The decision (and every value written,
event bodies included) is made in Python by a pure function; the store turns it into a
:class:`Change`: guards ("these fields still hold what the decision read", "this sequence
number is newer") and the writes that follow if they hold. ``apply.lua`` checks and writes;
nothing is built by string concatenation or substitution.

Each ``.lua`` file starts with a header naming its KEYS and ARGV.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from pydantic_core import from_json, to_json

if TYPE_CHECKING:
    # Annotations only: substratectl imports the stores' types (through the guard) and never
    # talks to Redis, so it does not pay for importing the client.
    import redis.asyncio as aioredis
    from redis.commands.core import AsyncScript

SCRIPTS = ("apply", "hashes", "lease_hold")
# Changes sent in one call at most: a larger batch holds Redis (single-threaded) for longer
# than other clients should wait; 500 heartbeats take about a millisecond there.
MAX_BATCH = 500
# A batch with more operations than this is encoded in a worker thread.
LARGE_BATCH_OPS = 10_000


@cache
def source(name: str) -> str:
    """The text of ``<name>.lua``; its header must name its KEYS and ARGV."""
    if name not in SCRIPTS:
        raise KeyError(f"no script {name!r} (there are: {', '.join(SCRIPTS)})")
    text = files(__package__).joinpath(f"{name}.lua").read_text()
    header = text.split("]]", 1)[0]
    if not text.startswith("--[[") or "KEYS" not in header or "ARGV" not in header:
        raise ValueError(f"{name}.lua must start with a header naming its KEYS and ARGV")
    return text


def script(redis: aioredis.Redis, name: str) -> AsyncScript:
    """A script registered with the client: sent as EVALSHA, loaded once if Redis lacks it."""
    registered: AsyncScript = redis.register_script(source(name))
    return registered


def encode(value: object) -> str:
    """How a value is stored in a hash field or string: None as '' (absent), booleans as
    '1'/'0', times as ISO 8601, everything else as ``str``."""
    if type(value) is str:  # most values, on the hot path: checked first
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@dataclass(slots=True)
class Change:
    """One atomic write: guards, then the commands to run if they hold.

    ``key`` names the record the change is mostly about; it is sent once and stands for itself
    wherever a guard or a command names it (a batch of heartbeats is mostly record keys)."""

    key: str = ""
    expect: list[tuple[str, str, str]] = field(default_factory=list)
    newer: list[tuple[str, str, str]] = field(default_factory=list)
    exists: list[tuple[str, str]] = field(default_factory=list)
    ops: list[list[str]] = field(default_factory=list)
    read: str | None = None
    read_fields: list[str] = field(default_factory=list)
    read_always: bool = False

    def _k(self, key: str) -> str:
        return "" if key == self.key else key

    # -- guards ---------------------------------------------------------------------------------

    def expecting(self, key: str, field_: str, value: object) -> Change:
        """Only if hash ``key``'s ``field_`` still holds ``value`` (None: absent)."""
        self.expect.append((self._k(key), field_, encode(value)))
        return self

    def expecting_value(self, key: str, value: object) -> Change:
        """Only if string ``key`` still holds ``value`` (None: absent)."""
        self.expect.append((self._k(key), "", encode(value)))
        return self

    def requiring(self, key: str, field_: str) -> Change:
        """Only if hash ``key`` has a field ``field_``."""
        self.exists.append((self._k(key), field_))
        return self

    def if_newer(self, key: str, field_: str, number: float) -> Change:
        """Only if ``number`` is above the number in hash ``key``'s ``field_``."""
        self.newer.append((self._k(key), field_, encode(number)))
        return self

    # -- writes ---------------------------------------------------------------------------------

    def run(self, command: str, key: str, *args: object) -> Change:
        op = [command, self._k(key)]
        for arg in args:
            op.append(arg if type(arg) is str else encode(arg))
        self.ops.append(op)
        return self

    def hset(self, key: str, fields: Mapping[str, object]) -> Change:
        if fields:
            op = ["HSET", self._k(key)]
            for name, value in fields.items():
                op.append(name)
                op.append(value if type(value) is str else encode(value))
            self.ops.append(op)
        return self

    def move(self, prefix: str, member: str, was: str | None, now: str) -> Change:
        """Move ``member`` from set ``prefix+was`` to ``prefix+now`` (index sets by status)."""
        if was == now:
            return self
        if was:
            self.run("SREM", prefix + was, member)
        return self.run("SADD", prefix + now, member)

    def push(self, key: str, entry: str) -> Change:
        """Append ``entry`` to list ``key`` (an outbox, say)."""
        return self.run("RPUSH", key, entry)

    def push_newest(self, key: str, entry: str, keep: int) -> Change:
        """Put ``entry`` first in list ``key`` and keep the newest ``keep`` (a history)."""
        return self.run("LPUSH", key, entry).run("LTRIM", key, 0, keep - 1)

    def reading(self, key: str, *fields: str, always: bool = False) -> Change:
        """Return hash ``key`` (or only these of its fields) when a guard fails, and after the
        write too with ``always``."""
        self.read = self._k(key)
        self.read_fields = list(fields)
        self.read_always = always
        return self

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ops": self.ops}
        if self.key:
            out["key"] = self.key
        if self.expect:
            out["expect"] = self.expect
        if self.newer:
            out["newer"] = self.newer
        if self.exists:
            out["exists"] = self.exists
        if self.read is not None:
            out["read"] = self.read
            if self.read_fields:
                out["read_fields"] = self.read_fields
            if self.read_always:
                out["read_always"] = True
        return out


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of a Change: whether it was written, and the hash it asked to read."""

    written: bool
    read: dict[str, str]


def _applied(reply: list[Any]) -> Applied:
    pairs = reply[1:]
    return Applied(bool(reply[0]), dict(zip(pairs[::2], pairs[1::2], strict=True)))


class Changes:
    """Applies Changes through ``apply.lua``, many in one call.

    Changes queue while a call is in flight and go together in the next one, so under load a
    call carries whatever arrived during the previous round trip (hundreds of heartbeats) and
    at rest a change waits for nothing. One call in flight at a time also keeps a client's
    changes in the order they were made. Each caller still gets its own result; a client's
    cost is mostly per call, not per change.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        # Importing redis.exceptions loads the whole client package, which the CLI (it imports
        # this module for the stores' types) never needs; a store that makes Changes does.
        from redis.exceptions import NoScriptError

        self._redis = redis
        self._script = script(redis, "apply")
        self._no_script = NoScriptError
        self._sha = self._script.sha
        self._queued: list[tuple[Change, asyncio.Future[Applied]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def apply(self, change: Change) -> Applied:
        future: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._queued.append((change, future))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                await self._call(batch)
        finally:
            self._sender = None

    async def _call(self, batch: list[tuple[Change, asyncio.Future[Applied]]]) -> None:
        # pydantic's serializer: the batch is the hot path's largest piece of work besides the
        # messages themselves, and this is about three times json.dumps's speed.
        changes = [change.to_json() for change, _ in batch]
        if sum(len(change.ops) for change, _ in batch) > LARGE_BATCH_OPS:
            # A controller's step to 50,000 cells is tens of megabytes: encoded off the event
            # loop, which the encoder would otherwise hold for its whole length.
            payload = await asyncio.to_thread(to_json, changes)
        else:
            payload = to_json(changes)
        try:
            try:
                # execute_command: redis-py's evalsha wrapper checks deprecated arguments on
                # every call, which costs more than the command's own packing.
                replies = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", self._sha, 0, payload
                )
            except self._no_script:
                await self._redis.script_load(self._script.script)
                replies = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", self._sha, 0, payload
                )
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(_applied(reply))


class Hashes:
    """Reads many hashes, or one field of each, in one reply (``hashes.lua``)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = script(redis, "hashes")

    async def _call(
        self, prefix: str, field_: str, members_of: str | None, ids: list[str] | None, take: bool
    ) -> list[Any]:
        keys = [members_of] if members_of is not None else []
        args = [prefix, "1" if take else "0", field_, *(ids or [])]
        reply: list[Any] = await self._script(keys=keys, args=args)
        return reply

    async def __call__(
        self,
        prefix: str,
        *,
        members_of: str | None = None,
        ids: list[str] | None = None,
        take: bool = False,
    ) -> list[tuple[str, dict[str, str]]]:
        """Every hash ``prefix+id`` for the ids in set ``members_of`` (the set deleted once
        read, with ``take``) or in ``ids``."""
        reply = await self._call(prefix, "", members_of, ids, take)
        return [(str(i), dict(zip(p[::2], p[1::2], strict=True))) for i, p in reply]

    async def as_json(self, prefix: str, *, ids: list[str]) -> list[dict[str, str]]:
        """The hashes ``prefix+id`` of ``ids``, in order ({} for one that does not exist),
        each sent by Redis as one JSON object and decoded all together: for pages of
        thousands of records, where two strings a field were most of the reading."""
        reply = await self._call(prefix, "*json", None, ids, False)
        records: list[dict[str, str]] = decode_many([str(v) for _, v in reply])
        return records

    async def field(
        self,
        prefix: str,
        field_: str,
        *,
        members_of: str | None = None,
        ids: list[str] | None = None,
    ) -> list[tuple[str, str]]:
        """One field of each of those hashes ('' where absent)."""
        reply = await self._call(prefix, field_, members_of, ids, False)
        return [(str(i), str(v)) for i, v in reply]


def decode_many(texts: list[str]) -> list[Any]:
    """Many JSON documents at once, decoded as one (several times faster than one at a
    time), their strings shared: many records repeat a few values (stages, orgs, releases)."""
    return from_json("[" + ",".join(texts) + "]", cache_strings="all") if texts else []
