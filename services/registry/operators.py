"""Operators: a broker user per person and their role, kept by the registry, which publishes the
whole roster to the other services (common/operators.py) on every change, at its start and
every ``roster_interval`` after.

An operator's broker user may only publish requests to ``substrate.rpc`` (replies come back on
direct reply-to, which needs no permission); what they may ask for is decided by their role in
each service, so a role change takes effect at their next request without touching the broker.

Redis layout (besides the registry's own, services/registry/store.py):

    registry:operators           hash  broker user -> OperatorView JSON
    registry:operators:version   the roster's version, raised with each change
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.bus.errors import RpcFailure
from common.clock import Clock
from common.messages import RPC_EXCHANGE, Delivery
from common.operators import OperatorsRoster
from common.outbox import Outbox, outbox_entry
from common.rabbitmq_api import RabbitApi
from common.requests.operators import (
    AddedOperator,
    OperatorsAdd,
    OperatorsList,
    OperatorsRemove,
    OperatorsSetRole,
    OperatorView,
)
from common.routes import Route, route
from common.scripts import Change, Changes
from common.vocabulary import Role

log = logging.getLogger(__name__)

OPERATORS = "registry:operators"
VERSION = "registry:operators:version"
# What every operator's broker user may do: publish requests, nothing else.
# A change is read, decided and written with the version it read; admins at keyboards rarely
# collide, so a few tries are plenty.
CHANGE_TRIES = 5
GRANT = {"configure": "^$", "write": f"^{re.escape(RPC_EXCHANGE)}$", "read": "^$"}
# The management console shows them the control plane's objects, never a message body.
TAGS = "management"


class OperatorStore:
    def __init__(self, redis: aioredis.Redis, outbox: Outbox, clock: Clock) -> None:
        self._redis = redis
        self._outbox = outbox
        self._clock = clock
        self._changes = Changes(redis)

    async def role_of(self, user: str) -> Role | None:
        view = await self.get(user)
        return None if view is None else view.role

    async def get(self, user: str) -> OperatorView | None:
        raw = await self._redis.hget(OPERATORS, user)
        return None if raw is None else OperatorView.model_validate_json(raw)

    async def all(self) -> list[OperatorView]:
        raw = await self._redis.hgetall(OPERATORS)
        views = [OperatorView.model_validate_json(v) for v in raw.values()]
        return sorted(views, key=lambda v: v.name)

    async def put(self, view: OperatorView) -> None:
        await self._change(view.name, view)

    async def remove(self, user: str) -> None:
        await self._change(user, None)

    async def _change(self, user: str, view: OperatorView | None) -> None:
        """The change (``view`` None removes), a new roster version and the roster event, in
        one write guarded on the version it read: every change raises the version, so two
        admins changing operators at once each publish a roster holding both changes."""
        for _ in range(CHANGE_TRIES):
            roster = await self.roster()
            roles = dict(roster.operators)
            change = Change().expecting_value(VERSION, roster.version or None)
            if view is None:
                roles.pop(user, None)
                change.run("HDEL", OPERATORS, user)
            else:
                roles[user] = view.role
                change.hset(OPERATORS, {user: view.model_dump_json()})
            event = self._event(roster.version + 1, roles)
            change.run("SET", VERSION, event.version).push(self._outbox.key, outbox_entry(event))
            if (await self._changes.apply(change)).written:
                return
        raise RpcFailure("busy", "the operators kept changing; try again")

    async def roster(self) -> OperatorsRoster:
        # The version first: a change that lands between the two reads then fails the guard
        # of a write decided on them, rather than being left out of its roster.
        version = int(await self._redis.get(VERSION) or 0)
        current = await self._redis.hgetall(OPERATORS)
        return self._event(version, _roles(current))

    async def publish_roster(self) -> None:
        """The roster as it stands, for services that started after its last change (or lost
        their copy); a service keeps the newest version it has seen."""
        await self._outbox.put(await self.roster())

    def _event(self, version: int, roles: dict[str, Role]) -> OperatorsRoster:
        return OperatorsRoster(at=self._clock.now(), version=version, operators=roles)


def _roles(raw: Mapping[Any, Any]) -> dict[str, Role]:
    """Broker user -> role, from the operators hash."""
    return {str(k): OperatorView.model_validate_json(v).role for k, v in raw.items()}


@dataclass(frozen=True)
class Operators:
    store: OperatorStore
    api: RabbitApi
    vhost: str
    clock: Clock
    # The broker users that are admins by configuration; they are no roster entry.
    admins: frozenset[str]


async def operators_add(req: OperatorsAdd, delivery: Delivery, ops: Operators) -> AddedOperator:
    if await ops.store.get(req.name) is not None:
        raise RpcFailure("exists", f"operator {req.name} exists (operators set-role changes it)")
    if req.name in ops.admins or await ops.api.user_exists(req.name):
        raise RpcFailure("exists", f"broker user {req.name} exists and is not an operator")
    password = secrets.token_urlsafe(24)
    view = OperatorView(
        name=req.name, role=req.role, added_at=ops.clock.now(), added_by=delivery.user_id or ""
    )
    try:
        await ops.api.put_user(req.name, password, tags=TAGS)
        await ops.api.set_permissions(ops.vhost, req.name, **GRANT)
        await ops.store.put(view)
    except Exception:
        log.exception("adding operator %s failed; undoing", req.name)
        await ops.api.delete_user(req.name)
        raise
    return AddedOperator(**dict(view), password=password)


async def operators_list(
    req: OperatorsList, delivery: Delivery, ops: Operators
) -> list[OperatorView]:
    return await ops.store.all()


async def _must_get(name: str, ops: Operators) -> OperatorView:
    view = await ops.store.get(name)
    if view is None:
        raise RpcFailure("not_found", f"no operator {name} (operators list shows them)")
    return view


async def operators_set_role(
    req: OperatorsSetRole, delivery: Delivery, ops: Operators
) -> OperatorView:
    view = await _must_get(req.name, ops)
    changed = view.model_copy(update={"role": req.role})
    await ops.store.put(changed)
    return changed


async def operators_remove(
    req: OperatorsRemove, delivery: Delivery, ops: Operators
) -> OperatorView:
    view = await _must_get(req.name, ops)
    if req.name == delivery.user_id:
        raise RpcFailure("refused", f"{req.name} cannot remove itself; another admin can")
    # The role goes first: once the roster says so no service answers them, even while the
    # broker is still closing their connections.
    await ops.store.remove(req.name)
    await ops.api.delete_user(req.name)
    return view


def rpc_routes(ops: Operators) -> list[Route]:
    return [
        route(OperatorsAdd, operators_add, ops),
        route(OperatorsList, operators_list, ops),
        route(OperatorsSetRole, operators_set_role, ops),
        route(OperatorsRemove, operators_remove, ops),
    ]
