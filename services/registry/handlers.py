"""The registry's handlers: cell reports, operator requests, and the liveness sweep.

Handlers take a validated message and the delivery facts, then their dependencies; they never
touch the messaging library. The routing tables are at the end.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from common import sealing
from common.bus.errors import Refused, RpcFailure, refuse_foreign_sender
from common.clock import Clock
from common.limits import PerCellLimit
from common.messages import (
    CellDebugAccess,
    CellHeartbeat,
    CellMaintenance,
    CellRegister,
    CellReport,
    CellUpgrade,
    CredentialsConfirmed,
    Delivery,
    FlagsChanged,
    InfraComplianceChanged,
    Message,
    SealedRotateCredentials,
    sealing_context,
)
from common.requests import ServiceStatus, Status
from common.requests.registry import (
    AuditEntry,
    CellsAudit,
    CellsCreate,
    CellsDecommission,
    CellsList,
    CellsRotateCredentials,
    CellsShow,
    CellView,
    CreatedCell,
    ListedCell,
    RegistryServiceStatus,
    RotatedCredentials,
)
from common.routes import Route, route
from services.registry import metrics, transitions
from services.registry.model import cell_amqp_url, offline_cutoff, stack_parameters
from services.registry.pages import Pages, flags_behind, listing
from services.registry.store import RegistryStore
from services.registry.transitions import Outcome

log = logging.getLogger(__name__)

# Warn once the cells would take this share of the broker's sockets (the services, the
# operators and reconnects need the rest).
SOCKET_HEADROOM = 0.9


class Publisher(Protocol):
    async def publish(self, message: Message) -> None: ...


class CellAccounts(Protocol):
    """The broker side of a cell: services.registry.broker.CellBroker, or a fake."""

    async def provision(self, cell_id: str, password: str) -> None: ...

    async def deprovision(self, cell_id: str) -> None: ...

    async def set_password(self, cell_id: str, password: str) -> None: ...

    async def close_connections(self, cell_id: str, reason: str) -> int: ...

    def queue_fingerprint(self, cell_id: str) -> str: ...

    async def queue_exists(self, cell_id: str) -> bool: ...

    async def ensure_queue(self, cell_id: str) -> None: ...

    async def socket_limit(self) -> int | None: ...


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
    heartbeat_limit: PerCellLimit = field(default_factory=lambda: PerCellLimit(0, 1))
    cell_ca: str = ""  # PEM, for the cells' stacks
    # Listings with the next page read ahead (services/registry/pages.py); None: read each.
    pages: Pages | None = None


# -- cell reports -------------------------------------------------------------------------------


async def on_cell_register(msg: CellRegister, delivery: Delivery, deps: Deps) -> None:
    refuse_foreign_sender(msg, delivery)
    now = deps.clock.now()
    t = await deps.store.transition(msg.cell_id, lambda r: transitions.register(r, msg, now))
    metrics.REGISTRATIONS.labels(t.outcome).inc()
    if t.foreign_rotation_key:
        metrics.REGISTRATIONS.labels("foreign_rotation_key").inc()
        log.warning(
            "cell %s registered with another key than the one bound; the bound key is kept "
            "(rotate with --rebind if the agent's state directory was replaced)",
            msg.cell_id,
        )
    if t.refusal is not None:
        log.warning("refused registration of %s: %s", msg.cell_id, t.refusal.reason)
        raise Refused(f"registration refused: {t.refusal.reason}")
    if t.outcome is Outcome.REGISTERED:
        log.info("cell %s registered from account %s", msg.cell_id, msg.aws_account_id)
        await ensure_queue(deps, msg.cell_id, msg.queue_missing)


async def ensure_queue(deps: Deps, cell_id: str, missing: bool | None) -> None:
    """An agent registers on every start and reconnect: its command queue comes back if
    someone deleted it (a command meanwhile was kept as unroutable, not dropped), and a queue
    declared by an older registry gets the bindings this one declares. Declared in full only
    then: a full declaration costs the broker seven round trips, which in a storm of
    registrations were most of the registry's work (bench/RESULTS.md). A queue known to be
    declared as now costs nothing where the agent looks for it itself (``missing`` False: it
    says so when it is missing), one round trip otherwise (does it still exist). A cell's
    word that it is missing is checked, not believed: it cannot make the registry declare
    again and again."""
    fingerprint = deps.accounts.queue_fingerprint(cell_id)
    if await deps.store.queue_declared(cell_id) == fingerprint:
        if missing is False or await deps.accounts.queue_exists(cell_id):
            return
        log.warning("cell %s's command queue was missing; declaring it again", cell_id)
    await deps.accounts.ensure_queue(cell_id)
    await deps.store.set_queue_declared(cell_id, fingerprint)


async def on_cell_heartbeat(msg: CellHeartbeat, delivery: Delivery, deps: Deps) -> None:
    refuse_foreign_sender(msg, delivery)
    if not deps.heartbeat_limit.allow(msg.cell_id, deps.clock.monotonic()):
        # Acked unapplied: a later heartbeat carries everything this one did.
        metrics.heartbeat_outcome("limited")
        return
    # Liveness is judged by the registry's clock, never the cell's ``sent_at``.
    now = deps.clock.now()
    t = await deps.store.heartbeat(
        msg.cell_id, msg.template_version, lambda r: transitions.heartbeat(r, msg, now)
    )
    metrics.heartbeat_outcome(t.outcome)
    if t.maintenance_seconds is not None:
        # The heartbeat ended a stay whose end the cell's maintenance report has not told.
        metrics.MAINTENANCE_DURATION.observe(t.maintenance_seconds)
    if t.outcome is Outcome.BACK_ONLINE:
        metrics.TRANSITIONS.labels("online").inc()
        log.info("cell %s is back online", msg.cell_id)
    if t.confirmed_rotation:
        metrics.ROTATIONS.labels("confirmed").inc()
        log.info("cell %s confirmed its new credentials %s", msg.cell_id, msg.credential_id)


async def on_cell_maintenance(msg: CellMaintenance, delivery: Delivery, deps: Deps) -> None:
    """Track when a cell entered maintenance and how long each stay lasted."""
    refuse_foreign_sender(msg, delivery)
    now = deps.clock.now()
    t = await deps.store.transition(msg.cell_id, lambda r: transitions.maintenance(r, msg, now))
    if t.maintenance_seconds is not None:
        metrics.MAINTENANCE_DURATION.observe(t.maintenance_seconds)
        log.info("cell %s left maintenance after %.0fs", msg.cell_id, t.maintenance_seconds)


async def on_cell_report(msg: CellReport, delivery: Delivery, deps: Deps) -> None:
    """Reports the registry does not record (upgrade progress is rollout's, and the registry's
    queue is no longer bound to it): only while an earlier version's replica still binds it
    during an upgrade do some arrive, and they are acked (the sender checked, as ever)."""
    refuse_foreign_sender(msg, delivery)


async def on_cell_debug_access(msg: CellDebugAccess, delivery: Delivery, deps: Deps) -> None:
    """Debug access a customer opened, closed, or that expired: kept as the cell's audit
    trail. Recording is all the control plane does with it."""
    refuse_foreign_sender(msg, delivery)
    t = await deps.store.transition(msg.cell_id, lambda r: transitions.debug_access(r, msg))
    if t.audit is not None:
        log.info("cell %s: debug access %s (%s)", msg.cell_id, msg.action, msg.role_arn)


async def on_compliance_changed(
    msg: InfraComplianceChanged, delivery: Delivery, deps: Deps
) -> None:
    await deps.store.transition(msg.cell_id, lambda r: transitions.compliance(r, msg))


async def on_credentials_confirmed(
    msg: CredentialsConfirmed, delivery: Delivery, deps: Deps
) -> None:
    """The agent holds its new secret: every connection of the cell's user still open was
    opened with the old one, so all are closed. The agent reconnects with the new secret; a
    holder of the old one cannot. Announced through the outbox with the confirmation, so a
    registry that dies in between closes them when the event is delivered again."""
    closed = await deps.accounts.close_connections(
        msg.cell_id, "credentials rotated: reconnect with the new secret"
    )
    log.info("cell %s: closed %d connections opened with its old secret", msg.cell_id, closed)


# -- operator requests --------------------------------------------------------------------------


async def cells_create(req: CellsCreate, delivery: Delivery, deps: Deps) -> CreatedCell:
    problem = await deps.store.reserve(req.id)
    if problem:
        raise RpcFailure("exists", problem)
    password = secrets.token_urlsafe(24)
    credential_id = uuid.uuid4().hex[:12]
    try:
        await deps.accounts.provision(req.id, password)
        await deps.store.create(req, deps.clock.now(), credential_id)
        await deps.store.set_queue_declared(req.id, deps.accounts.queue_fingerprint(req.id))
    except Exception:
        # Nothing half-created: undo the broker side, then free the id.
        log.exception("creating cell %s failed; undoing", req.id)
        await deps.accounts.deprovision(req.id)
        await deps.store.release(req.id)
        raise
    amqp_url = cell_amqp_url(deps.cell_broker_url, req.id, password)
    view = await _must_get(req.id, deps)
    return CreatedCell(
        **dict(view),
        amqp_url=amqp_url,
        stack_parameters=stack_parameters(req, amqp_url, deps.privatelink_service, deps.cell_ca),
    )


def _listed(cell: CellView, current: int) -> ListedCell:
    behind = flags_behind(cell.status, cell.flags_snapshot_version, current)
    return ListedCell(**dict(cell), flags_behind=behind)


async def cells_list(req: CellsList, delivery: Delivery, deps: Deps) -> list[ListedCell]:
    return await (deps.pages.page(req) if deps.pages else listing(deps.store, req))


async def cells_show(req: CellsShow, delivery: Delivery, deps: Deps) -> ListedCell:
    return _listed(await _must_get(req.id, deps), await deps.store.flags_version())


async def on_flags_changed(msg: FlagsChanged, delivery: Delivery, deps: Deps) -> None:
    await deps.store.raise_flags_version(msg.snapshot_version)


async def cells_rotate_credentials(
    req: CellsRotateCredentials, delivery: Delivery, deps: Deps
) -> RotatedCredentials:
    """Switch the cell's broker password and deliver the new one sealed to the agent's key.

    The broker holds one password per user, so the old one stops working for new connections
    at once; the agent's open connection stays up, takes the new secret (AMQP update-secret)
    and confirms in its next heartbeat, and then every connection opened with the old one is
    closed (``on_credentials_confirmed``). The command queue is readable by whoever holds the
    old secret, so the new one travels sealed to the key the agent registered: only the
    agent's state directory opens it. A cell with no key bound (an agent from before sealing,
    or ``rebind``) is sent nothing and cut off at once; the URL returned, once, is delivered
    to the customer by hand, as it is for a cell that is offline now.
    """
    cell = await _must_get(req.id, deps)
    if cell.status == "decommissioned":
        raise RpcFailure("decommissioned", f"cell {req.id!r} is decommissioned")
    password = secrets.token_urlsafe(24)
    credential_id = uuid.uuid4().hex[:12]
    now = deps.clock.now()
    key = None if req.rebind else cell.rotation_key
    await deps.accounts.set_password(req.id, password)
    url = cell_amqp_url(deps.cell_broker_url, req.id, password)
    if key is None:
        await deps.store.transition(
            req.id, lambda r: transitions.replace_credential(r, credential_id)
        )
        closed = await deps.accounts.close_connections(
            req.id, "credentials rotated: reconnect with the new secret"
        )
        metrics.ROTATIONS.labels("by_hand").inc()
        log.info("cell %s: new credentials to deliver by hand; closed %d", req.id, closed)
        return RotatedCredentials(
            id=req.id,
            credential_id=credential_id,
            status="deliver_by_hand",
            amqp_url=url,
            grace_seconds=0.0,
        )
    await deps.store.transition(req.id, lambda r: transitions.start_rotation(r, credential_id, now))
    context = sealing_context(req.id, credential_id)
    await deps.publisher.publish(
        SealedRotateCredentials(
            cell_id=req.id,
            issued_at=now,
            credential_id=credential_id,
            sealed_password=sealing.seal(key, password, context),
        )
    )
    metrics.ROTATIONS.labels("started").inc()
    return RotatedCredentials(
        id=req.id,
        credential_id=credential_id,
        status="pending_confirmation",
        amqp_url=url,
        grace_seconds=deps.credential_grace,
        rotation_key=key,
    )


async def cells_decommission(req: CellsDecommission, delivery: Delivery, deps: Deps) -> CellView:
    await _must_get(req.id, deps)
    # Cut the cell off first (deleting the user closes its connections), then keep the record.
    await deps.accounts.deprovision(req.id)
    now = deps.clock.now()
    await deps.store.transition(req.id, lambda r: transitions.decommission(r, req.id, now))
    return await _must_get(req.id, deps)


async def status(req: Status, delivery: Delivery, deps: Deps) -> ServiceStatus:
    counts = await deps.store.counts()
    by_status: dict[str, int] = {}
    for (_, state), n in counts.items():
        by_status[state] = by_status.get(state, 0) + n
    behind = await deps.store.flags_behind()
    limit = await deps.accounts.socket_limit()
    cells = sum(n for state, n in by_status.items() if state != "decommissioned")
    return RegistryServiceStatus(
        service="registry",
        ready=True,
        cells=by_status,
        flags_behind=len(behind),
        broker_socket_limit=limit,
        warnings=socket_warnings(cells, limit),
    )


def socket_warnings(cells: int, limit: int | None) -> list[str]:
    """Each cell's agent holds a connection: a broker that cannot open that many sockets turns
    cells away long before any service is busy."""
    if limit is None or cells <= SOCKET_HEADROOM * limit:
        return []
    return [
        f"{cells} cells are registered and the broker accepts at most {limit} sockets: raise "
        "its open-files limit (docs/operating.md: Running the broker for a fleet)"
    ]


async def cells_audit(req: CellsAudit, delivery: Delivery, deps: Deps) -> list[AuditEntry]:
    await _must_get(req.id, deps)
    return await deps.store.audit(req.id)


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
        await deps.store.transition(cell_id, transitions.end_rotation)
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


def event_routes(deps: Deps) -> list[Route]:
    return [
        route(FlagsChanged, on_flags_changed, deps),
        route(InfraComplianceChanged, on_compliance_changed, deps),
        route(CredentialsConfirmed, on_credentials_confirmed, deps),
    ]


def cell_routes(deps: Deps) -> list[Route]:
    return [
        route(CellRegister, on_cell_register, deps),
        route(CellHeartbeat, on_cell_heartbeat, deps),
        route(CellUpgrade, on_cell_report, deps),
        route(CellMaintenance, on_cell_maintenance, deps),
        route(CellDebugAccess, on_cell_debug_access, deps),
    ]


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(CellsCreate, cells_create, deps),
        route(CellsList, cells_list, deps),
        route(CellsShow, cells_show, deps),
        route(CellsRotateCredentials, cells_rotate_credentials, deps),
        route(CellsDecommission, cells_decommission, deps),
        route(CellsAudit, cells_audit, deps),
        route(Status, status, deps),
    ]
