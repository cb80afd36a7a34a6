"""The registry's handlers: cell reports, operator requests, and the liveness sweep.

Handlers take a validated message and the delivery facts, then their dependencies; they never
touch the messaging library. The routing tables are at the end.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from common.bus import Refused, RpcFailure
from common.clock import Clock
from common.messages import CellCreated as CellCreatedEvent
from common.messages import (
    CellDebugAccess,
    CellDecommissioned,
    CellHeartbeat,
    CellMaintenance,
    CellRegister,
    CellRegistered,
    CellRegistrationRefused,
    CellReport,
    CellUpgrade,
    Delivery,
    FlagsChanged,
    Message,
    RotateCredentials,
    sender_problem,
)
from services.registry import metrics
from services.registry.model import (
    CellFilter,
    CellRef,
    CellView,
    CreateCell,
    cell_amqp_url,
    offline_cutoff,
    stack_parameters,
)
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)


class Publisher(Protocol):
    async def publish(self, message: Message) -> None: ...


class CellAccounts(Protocol):
    """The broker side of a cell: services.registry.broker.CellBroker, or a fake."""

    async def provision(self, cell_id: str, password: str) -> None: ...

    async def deprovision(self, cell_id: str) -> None: ...

    async def set_password(self, cell_id: str, password: str) -> None: ...

    async def close_connections(self, cell_id: str, reason: str) -> int: ...


@dataclass(frozen=True)
class Deps:
    store: RegistryStore
    clock: Clock
    accounts: CellAccounts
    publisher: Publisher
    cell_broker_url: str
    privatelink_service: str
    offline_after: float
    credential_grace: float


# -- cell reports -------------------------------------------------------------------------------


def check_sender(msg: CellReport, delivery: Delivery) -> None:
    """Refuse (dead-letter) and count a report that speaks for another cell."""
    problem = sender_problem(msg, delivery)
    if problem is not None:
        metrics.REFUSED.labels(problem[0]).inc()
        raise Refused(problem[1])


async def on_cell_register(msg: CellRegister, delivery: Delivery, *, deps: Deps) -> None:
    check_sender(msg, delivery)
    now = deps.clock.now()
    record = await deps.store.get(msg.cell_id)
    if record is None or record.status == "decommissioned":
        why = "unknown_cell" if record is None else "decommissioned"
        await _refuse_registration(msg, why, f"cell is {why.replace('_', ' ')}", deps)
        return
    event = CellRegistered(
        at=now,
        cell_id=msg.cell_id,
        stage=record.stage,
        region=record.region,
        org=record.org,
        aws_account_id=msg.aws_account_id,
        agent_version=msg.agent_version,
        installed_release=msg.installed_release,
        template_version=msg.template_version,
    )
    outcome, detail, bound = await deps.store.register(
        msg.cell_id,
        account=msg.aws_account_id,
        seq=msg.seq,
        incarnation=msg.incarnation or "",
        now=now,
        agent_version=msg.agent_version,
        stack_name=msg.stack_name,
        template_version=msg.template_version,
        installed_release=msg.installed_release,
        event=event,
    )
    if outcome == "refused":
        message = f"cell is bound to AWS account {bound}" if detail == "account" else detail
        await _refuse_registration(msg, detail, message, deps)
        return
    metrics.REGISTRATIONS.labels(outcome).inc()
    if outcome == "registered":
        log.info("cell %s registered from account %s", msg.cell_id, msg.aws_account_id)


async def _refuse_registration(msg: CellRegister, reason: str, message: str, deps: Deps) -> None:
    """Record, announce and dead-letter a refused registration."""
    now = deps.clock.now()
    metrics.REGISTRATIONS.labels(f"refused_{reason}").inc()
    refusal = {
        "at": now.isoformat(),
        "reason": message,
        "aws_account_id": msg.aws_account_id,
        "region": msg.region,
    }
    event = CellRegistrationRefused(
        at=now, cell_id=msg.cell_id, reason=message, aws_account_id=msg.aws_account_id
    )
    await deps.store.record_refusal(msg.cell_id, refusal, event)
    log.warning("refused registration of %s: %s", msg.cell_id, message)
    raise Refused(f"registration refused: {message}")


async def on_cell_heartbeat(msg: CellHeartbeat, delivery: Delivery, *, deps: Deps) -> None:
    check_sender(msg, delivery)
    # Liveness is judged by the registry's clock, never the cell's ``sent_at``.
    now = deps.clock.now()
    outcome, confirmed = await deps.store.heartbeat(
        msg.cell_id,
        seq=msg.seq,
        now=now,
        agent_version=msg.agent_version,
        installed_release=msg.installed_release,
        applied_generation=msg.applied_generation,
        maintenance=msg.maintenance,
        template_version=msg.template_version,
        flags_snapshot_version=msg.flags_snapshot_version,
        credential_id=msg.credential_id,
    )
    metrics.heartbeat_outcome(outcome)
    if outcome == "back_online":
        metrics.TRANSITIONS.labels("online").inc()
        log.info("cell %s is back online", msg.cell_id)
    if confirmed:
        metrics.ROTATIONS.labels("confirmed").inc()
        log.info("cell %s confirmed its new credentials %s", msg.cell_id, msg.credential_id)


async def on_cell_maintenance(msg: CellMaintenance, delivery: Delivery, *, deps: Deps) -> None:
    """Track when a cell entered maintenance and how long each stay lasted."""
    check_sender(msg, delivery)
    outcome, took = await deps.store.maintenance(
        msg.cell_id, seq=msg.seq, enabled=msg.enabled, now=deps.clock.now(), until=msg.enabled_until
    )
    if outcome == "left":
        metrics.MAINTENANCE_DURATION.observe(took)
        log.info("cell %s left maintenance after %.0fs", msg.cell_id, took)


async def on_cell_report(msg: CellReport, delivery: Delivery, *, deps: Deps) -> None:
    """Reports the registry does not record yet (upgrade, debug access): the sender is still
    checked, so a forged one is dead-lettered and counted."""
    check_sender(msg, delivery)


# -- operator requests --------------------------------------------------------------------------


async def cells_create(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    cell = CreateCell.model_validate(params)
    problem = await deps.store.reserve(cell.id)
    if problem:
        raise RpcFailure("exists", problem)
    password = secrets.token_urlsafe(24)
    credential_id = uuid.uuid4().hex[:12]
    now = deps.clock.now()
    try:
        await deps.accounts.provision(cell.id, password)
        await deps.store.create(
            cell,
            now,
            credential_id,
            CellCreatedEvent(
                at=now, cell_id=cell.id, stage=cell.stage, region=cell.region, org=cell.org
            ),
        )
    except Exception:
        # Nothing half-created: undo the broker side, then free the id.
        log.exception("creating cell %s failed; undoing", cell.id)
        await deps.accounts.deprovision(cell.id)
        await deps.store.release(cell.id)
        raise
    amqp_url = cell_amqp_url(deps.cell_broker_url, cell.id, password)
    view = await _must_get(cell.id, deps)
    return {
        **view.model_dump(mode="json"),
        "amqp_url": amqp_url,
        "stack_parameters": stack_parameters(cell, amqp_url, deps.privatelink_service),
    }


def _with_flags(cell: CellView, current: int) -> dict[str, Any]:
    """The record, and whether the cell's flags snapshot is older than the current one."""
    held = cell.flags_snapshot_version
    behind = cell.status in ("online", "offline") and current > 0 and (held or 0) < current
    return {**cell.model_dump(mode="json"), "flags_behind": behind}


async def cells_list(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> list[Any]:
    query = CellFilter.model_validate(params)
    cells = await deps.store.find(stage=query.stage, status=query.status)
    current = await deps.store.flags_version()
    return [_with_flags(c, current) for c in cells]


async def cells_show(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = CellRef.model_validate(params)
    return _with_flags(await _must_get(ref.id, deps), await deps.store.flags_version())


async def on_flags_changed(msg: FlagsChanged, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.raise_flags_version(msg.snapshot_version)


async def cells_rotate_credentials(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    """Switch the cell's broker password and deliver the new one over its command queue.

    The broker holds one password per user, so the old one stops working for new connections
    at once; the agent's open connection stays up, takes the new secret (AMQP update-secret)
    and confirms in its next heartbeat. A connection still unconfirmed after the grace period
    is closed. The new URL is also returned, once, for a cell that is offline now.
    """
    ref = CellRef.model_validate(params)
    cell = await _must_get(ref.id, deps)
    if cell.status == "decommissioned":
        raise RpcFailure("decommissioned", f"cell {ref.id!r} is decommissioned")
    password = secrets.token_urlsafe(24)
    credential_id = uuid.uuid4().hex[:12]
    now = deps.clock.now()
    await deps.accounts.set_password(ref.id, password)
    await deps.store.start_rotation(ref.id, credential_id, now)
    await deps.publisher.publish(
        RotateCredentials(
            cell_id=ref.id, issued_at=now, credential_id=credential_id, password=password
        )
    )
    metrics.ROTATIONS.labels("started").inc()
    return {
        "id": ref.id,
        "credential_id": credential_id,
        "status": "pending_confirmation",
        "amqp_url": cell_amqp_url(deps.cell_broker_url, ref.id, password),
        "grace_seconds": deps.credential_grace,
    }


async def cells_decommission(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    ref = CellRef.model_validate(params)
    await _must_get(ref.id, deps)
    # Cut the cell off first (deleting the user closes its connections), then keep the record.
    await deps.accounts.deprovision(ref.id)
    now = deps.clock.now()
    await deps.store.decommission(ref.id, now, CellDecommissioned(at=now, cell_id=ref.id))
    return (await _must_get(ref.id, deps)).model_dump(mode="json")


async def status(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    counts = await deps.store.counts()
    by_status: dict[str, int] = {}
    for (_, state), n in counts.items():
        by_status[state] = by_status.get(state, 0) + n
    behind = await deps.store.flags_behind()
    return {"service": "registry", "ready": True, "cells": by_status, "flags_behind": len(behind)}


async def _must_get(cell_id: str, deps: Deps) -> CellView:
    cell = await deps.store.get(cell_id)
    if cell is None:
        raise RpcFailure("not_found", f"cell {cell_id!r} does not exist")
    return cell


# -- periodic work ------------------------------------------------------------------------------


async def sweep(deps: Deps) -> list[str]:
    """One liveness pass: mark silent cells offline, close connections of rotations that
    went unconfirmed past the grace period, refresh the gauges. Safe to run on every replica
    at once: each transition is atomic in Redis and happens once."""
    now = deps.clock.now()
    gone = await deps.store.sweep_offline(offline_cutoff(now, deps.offline_after), now)
    for cell_id in gone:
        metrics.TRANSITIONS.labels("offline").inc()
        log.info("cell %s is offline (no heartbeat for %.0fs)", cell_id, deps.offline_after)
    for cell_id in await deps.store.overdue_rotations(offline_cutoff(now, deps.credential_grace)):
        closed = await deps.accounts.close_connections(
            cell_id, "credentials rotated; reconnect with the new ones"
        )
        await deps.store.end_rotation(cell_id)
        metrics.ROTATIONS.labels("grace_expired").inc()
        log.warning(
            "cell %s did not confirm new credentials; closed %d connections", cell_id, closed
        )
    for (stage, state), n in (await deps.store.counts()).items():
        metrics.CELLS.labels(stage, state).set(n)
    oldest = await deps.store.oldest_heartbeat_epoch()
    metrics.HEARTBEAT_AGE_MAX.set(0 if oldest is None else max(0.0, now.timestamp() - oldest))
    metrics.FLAGS_BEHIND.set(len(await deps.store.flags_behind()))
    longest = await deps.store.oldest_maintenance_epoch()
    metrics.MAINTENANCE_AGE_MAX.set(0 if longest is None else max(0.0, now.timestamp() - longest))
    return gone


# -- routing ------------------------------------------------------------------------------------

CellHandler = Callable[..., Awaitable[None]]
RpcHandler = Callable[..., Awaitable[Any]]

EVENTS: dict[type[Message], CellHandler] = {FlagsChanged: on_flags_changed}

CELL_REPORTS: dict[type[Message], CellHandler] = {
    CellRegister: on_cell_register,
    CellHeartbeat: on_cell_heartbeat,
    CellUpgrade: on_cell_report,
    CellMaintenance: on_cell_maintenance,
    CellDebugAccess: on_cell_report,
}

RPC: dict[str, RpcHandler] = {
    "cells.create": cells_create,
    "cells.list": cells_list,
    "cells.show": cells_show,
    "cells.rotate_credentials": cells_rotate_credentials,
    "cells.decommission": cells_decommission,
    "status": status,
}
