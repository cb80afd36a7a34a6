"""The flags service's handlers: flag definitions and their audit log, central evaluation, the
preview of a change over the fleet, and answering a cell's sync with the current snapshot. What
it knows of cells is the fleet view's (common.fleet)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.bus.errors import RpcFailure, refuse_foreign_sender
from common.clock import Clock
from common.flags import Flag, Snapshot
from common.fleet import FleetCell
from common.messages import CellSync, CellUpgrade, Delivery
from common.requests import ServiceStatus, Status
from common.requests.flags import (
    Answer,
    FlagChange,
    FlagDeleted,
    FlagsDelete,
    FlagsEval,
    FlagsHistory,
    FlagsList,
    FlagsPreview,
    FlagsServiceStatus,
    FlagsSet,
    FlagsShow,
    FlagsSnapshotShow,
    FlagSummary,
    FlagView,
    Flip,
    HistoryEntry,
    Preview,
    SnapshotView,
)
from common.routes import Route, route
from services.flags import metrics
from services.flags.store import Conflict, FlagsStore

# A change is read, decided and written with the flag and version it read; another operator's
# change in between makes it read again. A few tries are plenty for people at keyboards.
CHANGE_TRIES = 5


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Deps:
    store: FlagsStore
    clock: Clock
    # Called after a change: the pusher sends the new snapshot to every online cell.
    changed: Callable[[], None] = _nothing
    # Sends one cell its snapshot (a sync's answer).
    send_snapshot: Callable[[str, Snapshot], Awaitable[None]] | None = None


def _actor(delivery: Delivery) -> str:
    return delivery.user_id or "unknown"


# -- definitions ----------------------------------------------------------------------------------


async def flags_set(req: FlagsSet, delivery: Delivery, deps: Deps) -> FlagChange:
    flag = req.flag
    for _ in range(CHANGE_TRIES):
        raw = await deps.store.raw(flag.key)
        if raw is not None and Flag.model_validate_json(raw) == flag:
            version = await deps.store.version()
            return FlagChange(key=flag.key, changed=False, snapshot_version=version)
        try:
            version = await deps.store.change(
                flag.key, expected=raw, new=flag, actor=_actor(delivery), at=deps.clock.now()
            )
        except Conflict:
            continue
        deps.changed()
        return FlagChange(key=flag.key, changed=True, snapshot_version=version,
                          action="created" if raw is None else "updated")  # fmt: skip
    raise RpcFailure("busy", f"flag {flag.key} kept changing; try again")


async def flags_delete(req: FlagsDelete, delivery: Delivery, deps: Deps) -> FlagDeleted:
    for _ in range(CHANGE_TRIES):
        raw = await deps.store.raw(req.key)
        if raw is None:
            raise RpcFailure("not_found", f"flag {req.key!r} does not exist")
        try:
            version = await deps.store.change(
                req.key, expected=raw, new=None, actor=_actor(delivery), at=deps.clock.now()
            )
        except Conflict:
            continue
        deps.changed()
        return FlagDeleted(key=req.key, deleted=True, snapshot_version=version)
    raise RpcFailure("busy", f"flag {req.key} kept changing; try again")


async def flags_list(req: FlagsList, delivery: Delivery, deps: Deps) -> list[FlagSummary]:
    snapshot = await deps.store.snapshot()
    return [
        FlagSummary(key=f.key, owner=f.owner, enabled=f.enabled,
                    default_variant=f.default_variant, rules=len(f.rules),
                    requires_release=f.requires_release, description=f.description)
        for f in (snapshot.flags[k] for k in sorted(snapshot.flags))
    ]  # fmt: skip


async def flags_show(req: FlagsShow, delivery: Delivery, deps: Deps) -> FlagView:
    flag = await deps.store.get(req.key)
    if flag is None:
        raise RpcFailure("not_found", f"flag {req.key!r} does not exist")
    return FlagView(**dict(flag), snapshot_version=await deps.store.version())


async def flags_history(req: FlagsHistory, delivery: Delivery, deps: Deps) -> list[HistoryEntry]:
    history = await deps.store.history(req.key)
    if not history:
        raise RpcFailure("not_found", f"flag {req.key!r} has no history")
    return history


# -- evaluation -----------------------------------------------------------------------------------


async def flags_eval(req: FlagsEval, delivery: Delivery, deps: Deps) -> Answer:
    if (req.cell is None) == (req.attributes is None):
        raise RpcFailure("invalid", "give exactly one of cell (an id) or attributes")
    if req.cell is not None:
        cell = await deps.store.fleet.get(req.cell)
        if cell is None:
            raise RpcFailure("not_found", f"the flags service knows no cell {req.cell!r}")
        attributes = cell.attributes()
    else:
        assert req.attributes is not None
        attributes = req.attributes
    snapshot = await deps.store.snapshot()
    answer = snapshot.evaluate(req.key, attributes, req.default)
    metrics.evaluated(req.key, answer.reason)
    return Answer.model_validate(answer.as_json())


async def flags_snapshot(req: FlagsSnapshotShow, delivery: Delivery, deps: Deps) -> SnapshotView:
    snapshot = await deps.store.snapshot()
    return SnapshotView(version=snapshot.version, flags=snapshot.to_wire())


def preview(key: str, current: Snapshot, proposed: Snapshot, cells: list[FleetCell]) -> Preview:
    """Which cells would flip, and how, if ``proposed`` replaced ``current``: counts of
    (stage, org, from variant, to variant) for every cell whose variant changes."""
    flips: Counter[tuple[str, str, str, str]] = Counter()
    considered = held = 0
    for cell in cells:
        if cell.status == "decommissioned":
            continue
        considered += 1
        held += cell.held
        attributes = cell.attributes()
        before = current.evaluate(key, attributes)
        after = proposed.evaluate(key, attributes)
        if before.variant != after.variant:
            flips[(cell.stage or "-", cell.org or "-",
                   before.variant or "(none)", after.variant or "(none)")] += 1  # fmt: skip
    by_stage: dict[str, Counter[str]] = {}
    by_org: dict[str, Counter[str]] = {}
    for (stage, org, was, becomes), n in flips.items():
        by_stage.setdefault(stage, Counter())[f"{was} -> {becomes}"] += n
        by_org.setdefault(org, Counter())[f"{was} -> {becomes}"] += n
    return Preview(
        key=key,
        cells=considered,
        flipping=sum(flips.values()),
        held=held,
        by_stage={s: dict(c) for s, c in sorted(by_stage.items())},
        by_org={o: dict(c) for o, c in sorted(by_org.items())},
        changes=[
            Flip(stage=s, org=o, from_=b, to=a, cells=n)
            for (s, o, b, a), n in sorted(flips.items())
        ],
    )


async def flags_preview(req: FlagsPreview, delivery: Delivery, deps: Deps) -> Preview:
    """Nothing is written: what ``flags set`` of this flag would change, cell by cell."""
    current = await deps.store.snapshot()
    proposed = Snapshot(current.version + 1, {**current.flags, req.flag.key: req.flag})
    return preview(req.flag.key, current, proposed, await deps.store.fleet.all())


# -- what cells ask -------------------------------------------------------------------------------


async def on_cell_sync(msg: CellSync, delivery: Delivery, deps: Deps) -> None:
    """A cell whose snapshot is older than the current one (or that has none) is sent it: how
    a change made while the cell was offline reaches it."""
    refuse_foreign_sender(msg, delivery)
    snapshot = await deps.store.snapshot()
    held = msg.flags_snapshot_version
    if held is not None and held >= snapshot.version:
        return
    if deps.send_snapshot is not None:
        await deps.send_snapshot(msg.cell_id, snapshot)


async def status(req: Status, delivery: Delivery, deps: Deps) -> ServiceStatus:
    snapshot = await deps.store.snapshot()
    return FlagsServiceStatus(service="flags", ready=True, flags=len(snapshot.flags),
                              snapshot_version=snapshot.version)  # fmt: skip


# -- routing --------------------------------------------------------------------------------------


def cell_routes(deps: Deps) -> list[Route]:
    # The installed release is an attribute rules and version gates read.
    return [route(CellUpgrade, deps.store.fleet.on_upgrade), route(CellSync, on_cell_sync, deps)]


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(FlagsSet, flags_set, deps),
        route(FlagsDelete, flags_delete, deps),
        route(FlagsList, flags_list, deps),
        route(FlagsShow, flags_show, deps),
        route(FlagsHistory, flags_history, deps),
        route(FlagsEval, flags_eval, deps),
        route(FlagsSnapshotShow, flags_snapshot, deps),
        route(FlagsPreview, flags_preview, deps),
        route(Status, status, deps),
    ]
