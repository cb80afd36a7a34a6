"""The infra_compliance service's handlers: publishing a template, the operators' views, and
keeping each cell's compliance in step with what it runs (from the fleet view's events).
Timers (reminders and deadlines) are timers.py's."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from common.bus.errors import RpcFailure
from common.clock import Clock
from common.fleet import REGISTRY_FACTS, FleetCell
from common.messages import (
    CellRegistered,
    CellRegistrationRefused,
    Delivery,
    Event,
    InfraComplianceChanged,
    InfraTemplatePublished,
)
from common.requests import ServiceStatus, Status
from common.requests.infra import (
    CellCompliance,
    ComplianceSummary,
    ComplianceView,
    InfraList,
    InfraPublish,
    InfraServiceStatus,
    InfraStatus,
    PublishedTemplate,
)
from common.routes import Route, route
from services.infra_compliance import metrics, model
from services.infra_compliance.store import Conflict, InfraStore, TemplateRecord, record_of

log = logging.getLogger(__name__)

# A cell's record is written guarded on what was read; its writers are this handler and the
# timer loop, so a second try almost always succeeds.
CONFLICT_TRIES = 8


class TemplateStorage(Protocol):
    """The AWS side (services.infra_compliance.aws.InfraAws, or a fake in unit tests)."""

    async def lint(self, template: str) -> list[str]: ...

    async def store(self, key: str, body: str) -> str: ...


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Deps:
    store: InfraStore
    clock: Clock
    aws: TemplateStorage
    # Wakes the timer loop: a timer was set that may be due before its next tick.
    wake_timers: Callable[[], None] = _nothing
    # Starts bringing every cell up to date with the published templates (in the background).
    reconcile_all: Callable[[], None] = _nothing


# -- a cell's compliance --------------------------------------------------------------------------


async def templates(store: InfraStore) -> list[model.Template]:
    return [t.template() for t in await store.templates()]


async def reconcile(
    deps: Deps, cell_id: str, published: list[model.Template] | None = None
) -> bool:
    """Bring one cell's compliance up to date with what it runs and what is published; True if
    anything changed (the cell was told)."""
    store = deps.store
    published = published if published is not None else await templates(store)
    for _ in range(CONFLICT_TRIES):
        raw = await store.record(cell_id)
        cell = await store.fleet.get(cell_id)
        try:
            if cell is None or cell.status == "decommissioned":
                if raw:
                    await store.forget(cell_id, raw)
                return False
            if cell.status == "created":
                return False  # not registered yet: what it runs is not known
            plan = model.reconcile(
                record_of(raw), cell_id, cell.template_version, published, deps.clock.now()
            )
            if not plan.changed:
                return False
            await store.save(
                cell_id,
                raw,
                plan.record,
                timers=plan.timers,
                drop_timers=plan.drop_timers,
                events=plan.events,
                command=plan.command,
            )
        except Conflict:
            continue
        if plan.timers:
            deps.wake_timers()
        if not model.is_published(published, cell.template_version):
            metrics.UNPUBLISHED.inc()
            log.warning(
                "cell %s reports template %r, never published: counted as none",
                cell_id,
                cell.template_version,
            )
        log.info(
            "cell %s: %s (template %s, required %s)",
            cell_id,
            plan.record.state,
            cell.template_version,
            plan.record.required_version,
        )
        return True
    raise RuntimeError(f"cell {cell_id}'s compliance kept changing; the message is retried")


async def reconcile_fleet(deps: Deps) -> int:
    """Every known cell, once (after a publish, and now and then as a safety net)."""
    published = await templates(deps.store)
    cells = await deps.store.fleet.all()
    for cell in cells:
        await reconcile(deps, cell.id, published)
    return len(cells)


async def on_fact(msg: Event, delivery: Delivery, deps: Deps) -> None:
    """A cell registered, reported another template version, or was decommissioned."""
    cell_id = getattr(msg, "cell_id", None)
    assert isinstance(cell_id, str)
    told = await deps.store.fleet.apply(msg) is not None and await reconcile(deps, cell_id)
    if isinstance(msg, CellRegistered) and not told:
        # An agent registers at every start and reconnect; one that lost what it was told (a
        # new state directory) hears it again.
        again = model.required_now(
            cell_id, record_of(await deps.store.record(cell_id)), deps.clock.now()
        )
        if again is not None:
            await deps.store.announce(again)


async def on_ignored(msg: Event, delivery: Delivery, deps: Deps) -> None:
    """Events on the same queue that change nothing here (acked, not dead-lettered)."""


# -- publishing -----------------------------------------------------------------------------------


def _published(t: TemplateRecord) -> PublishedTemplate:
    return PublishedTemplate(
        version=str(t.version),
        location=t.location,
        published_at=t.published_at,
        published_by=t.published_by,
        grace_seconds=t.grace_seconds,
        deadline=t.published_at + timedelta(seconds=t.grace_seconds),
    )


async def infra_publish(req: InfraPublish, delivery: Delivery, deps: Deps) -> PublishedTemplate:
    """Refused, with nothing stored, for a version not newer than the newest, a grace that does
    not parse, or a template cfn-lint finds fault with."""
    try:
        grace = model.parse_duration(req.grace)
    except ValueError as exc:
        raise RpcFailure("invalid", f"grace: {exc}") from None
    version = int(req.version)
    newest = await deps.store.newest()
    if version <= newest:
        what = "is already published" if version == newest else f"is older than {newest}"
        raise RpcFailure("conflict", f"template version {version} {what}; publish a newer version")
    findings = await deps.aws.lint(req.template)
    if findings:
        raise RpcFailure("invalid", "template fails cfn-lint: " + "; ".join(findings[:10]))
    # A stack reports the version its template declares: one that declares another would
    # leave every cell that applies it on a version never published (counted as none).
    declared = model.template_version_of(req.template)
    if declared != str(version):
        raise RpcFailure(
            "invalid",
            f"template's TemplateVersion output is {declared!r}, not {req.version!r}: publish "
            "it as the version it declares",
        )
    # The content's hash in the key: a publish that loses a race writes beside the winner's.
    digest = hashlib.sha256(req.template.encode()).hexdigest()[:12]
    location = await deps.aws.store(f"templates/{version}/{digest}.yaml", req.template)
    now = deps.clock.now()
    record = TemplateRecord(
        version=version,
        location=location,
        published_at=now,
        grace_seconds=grace.total_seconds(),
        published_by=delivery.user_id or "unknown",
    )
    event = InfraTemplatePublished(
        at=now,
        version=req.version,
        location=location,
        deadline=now + grace,
        grace_seconds=grace.total_seconds(),
    )
    if not await deps.store.publish(record, newest, event):
        raise RpcFailure("conflict", "another template version was published meanwhile")
    log.info("template %s published at %s; deadline %s", version, location, now + grace)
    deps.reconcile_all()
    return _published(record)


async def infra_list(req: InfraList, delivery: Delivery, deps: Deps) -> list[PublishedTemplate]:
    return [_published(t) for t in reversed(await deps.store.templates())]


# -- what operators see ---------------------------------------------------------------------------


def summarize(rows: list[CellCompliance], now: datetime) -> ComplianceSummary:
    def within(hours: float) -> int:
        until = now + timedelta(hours=hours)
        return sum(
            r.state == "pending" and r.deadline is not None and r.deadline <= until for r in rows
        )

    return ComplianceSummary(
        compliant=sum(r.state == "compliant" for r in rows),
        pending=sum(r.state == "pending" for r in rows),
        out_of_sla=sum(r.state == "out_of_sla" for r in rows),
        breach_within_24h=within(24),
        breach_within_7d=within(24 * 7),
    )


def _row(cell: FleetCell, record: model.Record | None) -> CellCompliance:
    r = record or model.Record()
    return CellCompliance(
        cell=cell.id,
        org=cell.org,
        template_version=cell.template_version,
        required_version=str(r.required_version) if r.required_version else None,
        deadline=r.deadline,
        state=r.state or "compliant",
        reminders_sent=r.reminders_sent,
    )


async def infra_status(req: InfraStatus, delivery: Delivery, deps: Deps) -> ComplianceView:
    records = await deps.store.records()
    cells = [c for c in await deps.store.fleet.all() if c.status in ("online", "offline")]
    if req.cell is not None:
        cells = [c for c in cells if c.id == req.cell]
        if not cells:
            raise RpcFailure("not_found", f"infra_compliance knows no registered cell {req.cell!r}")
    rows = [_row(c, records.get(c.id)) for c in cells]
    return ComplianceView(cells=rows, summary=summarize(rows, deps.clock.now()))


async def status(req: Status, delivery: Delivery, deps: Deps) -> ServiceStatus:
    newest = await deps.store.newest()
    counts = await deps.store.counts()
    return InfraServiceStatus(
        service="infra_compliance",
        ready=True,
        newest_template=str(newest) if newest else None,
        cells={state: n for state, n in counts.items()},
    )


# -- routing --------------------------------------------------------------------------------------


def event_routes(deps: Deps) -> list[Route]:
    return [
        *(route(m, on_fact, deps) for m in REGISTRY_FACTS),
        route(CellRegistrationRefused, on_ignored, deps),
        route(InfraComplianceChanged, on_ignored, deps),
    ]


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(InfraPublish, infra_publish, deps),
        route(InfraList, infra_list, deps),
        route(InfraStatus, infra_status, deps),
        route(Status, status, deps),
    ]
