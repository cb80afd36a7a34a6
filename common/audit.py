"""Who asked a service for what, and what came of it: each service authorises every request by
the role of its broker-validated ``user_id`` (``Guard``) and keeps an audit log of each write
and each refusal in its own Redis (``AuditLog``), for ``audit_retention_days``.

The log is a Redis stream: appended once per request, before the answer goes out, and trimmed
by age as it is appended to. ``substratectl audit`` asks every service and merges the answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from common.clock import Clock
from common.fields import printable
from common.messages import Delivery
from common.operators import RoleSource, allows
from common.requests import Request
from common.requests.audit import AuditList, AuditRecord, AuditResult
from common.routes import Route
from common.vocabulary import Role

if TYPE_CHECKING:
    # Only services hold an audit log; the CLI, which imports the guard's types, needs no Redis.
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# Parameters that name what a request is about, in the order they are looked for.
TARGET_FIELDS = ("cell", "id", "cell_id", "key", "version", "name")
# How many entries one query reads at most, newest first, before filtering.
SCAN_LIMIT = 20_000
DETAIL_CHARS = 300


def target_of(params: dict[str, Any]) -> str:
    """What a request is about: the first of TARGET_FIELDS in its parameters, or in a mapping
    among them (a flag file's key, a release file's version)."""
    for layer in (params, *(v for v in params.values() if isinstance(v, dict))):
        for name in TARGET_FIELDS:
            value = layer.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool):
                return printable(str(value))[:128]
    return ""


class Forbidden(Exception):
    """The sender's role may not make this request; the message says which role may."""

    def __init__(self, message: str, role: Role | None) -> None:
        super().__init__(message)
        self.role = role


class AuditLog:
    def __init__(self, redis: aioredis.Redis, key: str, clock: Clock, retention: timedelta) -> None:
        self._redis = redis
        self._key = key
        self._clock = clock
        self._retention = retention

    def now(self) -> datetime:
        return self._clock.now().astimezone(UTC)

    async def record(self, entry: AuditRecord) -> None:
        oldest = self.now() - self._retention
        await self._redis.xadd(
            self._key,
            {"entry": entry.model_dump_json()},
            minid=str(int(oldest.timestamp() * 1000)),
            approximate=True,
        )

    async def query(self, ask: AuditList) -> list[AuditRecord]:
        """The newest entries matching ``ask``, newest first."""
        found: list[AuditRecord] = []
        last = "+"
        scanned = 0
        while scanned < SCAN_LIMIT and len(found) < ask.limit:
            batch = await self._redis.xrevrange(self._key, max=last, min="-", count=500)
            if not batch:
                break
            for _, fields in batch:
                scanned += 1
                entry = AuditRecord.model_validate_json(fields["entry"])  # type: ignore[index]
                if ask.since is not None and entry.at < ask.since:
                    return found
                if ask.operator and entry.operator != ask.operator:
                    continue
                if ask.target and entry.target != ask.target:
                    continue
                found.append(entry)
                if len(found) >= ask.limit:
                    break
            last = "(" + str(batch[-1][0])
        return found


@dataclass(frozen=True)
class Guard:
    """Authorises a service's requests and audits them."""

    service: str
    roles: RoleSource
    # Broker users that are admins whatever the roster says (SUBSTRATE_ADMINS).
    admins: frozenset[str]
    audit: AuditLog

    async def role_of(self, user: str | None) -> Role | None:
        if not user:
            return None
        if user in self.admins:
            return "admin"
        return await self.roles(user)

    async def admit(self, model: type[Request[Any]], delivery: Delivery) -> Role | None:
        """The sender's role; Forbidden when it may not send ``model``."""
        user = delivery.user_id
        role = await self.role_of(user)
        if allows(role, model.needs):
            return role
        if not user:
            who = "a request without a broker-validated user_id"
        elif role is None:
            who = f"{user} is no operator"
        else:
            who = f"{user} is {'an' if role[0] in 'aeiou' else 'a'} {role}"
        raise Forbidden(f"{who}: {model.method} needs the {model.needs} role", role)

    async def record(
        self,
        method: str,
        params: dict[str, Any],
        delivery: Delivery,
        role: Role | None,
        *,
        result: AuditResult,
        detail: str = "",
    ) -> None:
        reason = params.get("reason")
        if not detail and isinstance(reason, str):
            detail = reason  # why an operator did it (rollout promote --reason)
        entry = AuditRecord(
            at=self.audit.now(),
            service=self.service,
            method=method,
            operator=delivery.user_id or "",
            role=role or "",
            result=result,
            target=target_of(params),
            detail=printable(detail)[:DETAIL_CHARS],
            message_id=delivery.message_id or "",
        )
        try:
            await self.audit.record(entry)
        except Exception:
            # The request's own effect stands; the log says what was not recorded.
            log.exception("could not audit %s", entry.model_dump_json())

    def routes(self) -> list[Route]:
        async def audit_list(ask: AuditList, delivery: Delivery) -> list[AuditRecord]:
            return await self.audit.query(ask)

        return [Route(AuditList, audit_list)]
