"""Who may do what: operators' roles, and each service's view of them.

An operator is a broker user (``op-<name>``), so the identity a service authorises is the
request's ``user_id``, which the broker has validated. The registry keeps the operators (it makes
their broker users) and publishes the whole roster, versioned, on every change and at its start;
every other service keeps the newest roster it has seen (``RosterView``), as it keeps the cell
facts it needs. The broker users named in ``SUBSTRATE_ADMINS`` are admins whatever the roster
says: the first admin, before there is any roster, and the way back in if it is lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from common.fields import WireInt
from common.messages import Delivery, Event, wire
from common.routes import Route
from common.scripts import Change, Changes
from common.vocabulary import ROLES, Role

if TYPE_CHECKING:
    import redis.asyncio as aioredis


def allows(role: Role | None, needed: Role) -> bool:
    """Each role may do what the ones before it in ROLES may, and more."""
    return role is not None and ROLES.index(role) >= ROLES.index(needed)


OPERATOR_PREFIX = "op-"
_USER = re.compile(r"^op-[a-z][a-z0-9-]{0,40}[a-z0-9]$")


def operator_user(name: str) -> str:
    """The broker user for an operator named ``name`` (``alice`` or ``op-alice``); ValueError
    saying what a name may be."""
    user = name if name.startswith(OPERATOR_PREFIX) else OPERATOR_PREFIX + name
    if not _USER.fullmatch(user):
        raise ValueError(
            f"operator name {name!r} is not 2 to 42 lower-case letters, digits and '-', "
            "starting with a letter (the broker user is op-<name>)"
        )
    return user


def admins_from(setting: str) -> frozenset[str]:
    """``SUBSTRATE_ADMINS``: broker users separated by commas."""
    return frozenset(part.strip() for part in setting.split(",") if part.strip())


@wire("operators.roster.v1")
class OperatorsRoster(Event):
    """Every operator and their role; a newer ``version`` replaces an older roster whole."""

    event_key: ClassVar[str] = "operators.roster"

    version: WireInt
    operators: dict[str, Role] = Field(max_length=10_000)


# The role of a broker user, or None for one that is no operator.
RoleSource = Callable[[str], Awaitable[Role | None]]


class RosterView:
    """A service's copy of the registry's roster, in its own Redis (so each replica reads the
    same one), read at each request: requests are few and an operator's role change must take
    effect on the next one."""

    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self._redis = redis
        self._key = key
        self._changes = Changes(redis)

    async def apply(self, roster: OperatorsRoster) -> bool:
        """Newest wins: a roster redelivered, or older than one a replica already stored,
        changes nothing."""
        change = (
            Change()
            .if_newer(self._key, "version", roster.version)
            .hset(self._key, {"version": roster.version, "operators": json.dumps(roster.operators)})
        )
        return (await self._changes.apply(change)).written

    async def role_of(self, user: str) -> Role | None:
        raw = await self._redis.hget(self._key, "operators")
        if raw is None:
            return None
        role = json.loads(raw).get(user)
        return next((r for r in ROLES if r == role), None)

    def routes(self) -> list[Route]:
        async def on_roster(msg: OperatorsRoster, delivery: Delivery) -> None:
            await self.apply(msg)

        return [Route(OperatorsRoster, on_roster)]
