"""The flags service's handlers: flag definitions and their audit log, central evaluation, the
preview of a change over the fleet, and answering a cell's sync with the current snapshot. What
it knows of cells is the fleet view's (common.fleet)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.bus.errors import RpcFailure, refuse_foreign_sender
from common.clock import Clock
from common.flags import Snapshot
from common.messages import CellSync, CellUpgrade, Delivery
from common.requests import ServiceStatus, Status
from common.requests.flags import (
    Answer,
    FlagDeleted,
    FlagsDelete,
    FlagsEval,
    FlagsHistory,
    FlagsList,
    FlagsPreview,
    FlagsServiceStatus,
    FlagsShow,
    FlagsSnapshotShow,
    FlagSummary,
    FlagView,
    HistoryEntry,
    Preview,
    SnapshotView,
)
from common.routes import Route, route
from services.flags import metrics, model
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
    # Stages where a change of any cell's answer waits for a second operator's approval.
    approval_stages: frozenset[str] = frozenset()


def actor_of(delivery: Delivery) -> str:
    return delivery.user_id or "unknown"


# -- definitions ----------------------------------------------------------------------------------


async def flags_delete(req: FlagsDelete, delivery: Delivery, deps: Deps) -> FlagDeleted:
    for _ in range(CHANGE_TRIES):
        raw = await deps.store.raw(req.key)
        if raw is None:
            raise RpcFailure("not_found", f"flag {req.key!r} does not exist")
        try:
            version = await deps.store.change(
                req.key, expected=raw, new=None, actor=actor_of(delivery), at=deps.clock.now()
            )
        except Conflict:
            continue
        deps.changed()
        return FlagDeleted(key=req.key, deleted=True, snapshot_version=version)
    raise RpcFailure("busy", f"flag {req.key} kept changing; try again")


async def flags_list(req: FlagsList, delivery: Delivery, deps: Deps) -> list[FlagSummary]:
    snapshot = await deps.store.snapshot()
    return [model.summary(snapshot.flags[key]) for key in sorted(snapshot.flags)]


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


async def flags_preview(req: FlagsPreview, delivery: Delivery, deps: Deps) -> Preview:
    """Nothing is written: what ``flags set`` of this flag would change, cell by cell."""
    current = await deps.store.snapshot()
    after = model.proposed(current, req.flag)
    return model.preview(req.flag.key, current, after, await deps.store.fleet.groups())


# -- what cells ask -------------------------------------------------------------------------------


async def on_cell_sync(msg: CellSync, delivery: Delivery, deps: Deps) -> None:
    """A cell whose snapshot is older than the current one (or that has none) is sent it: how
    a change made while the cell was offline reaches it."""
    refuse_foreign_sender(msg, delivery)
    snapshot = await deps.store.snapshot()
    if not model.needs_snapshot(msg.flags_snapshot_version, snapshot):
        return
    if deps.send_snapshot is not None:
        await deps.send_snapshot(msg.cell_id, snapshot)


async def status(req: Status, delivery: Delivery, deps: Deps) -> ServiceStatus:
    snapshot = await deps.store.snapshot()
    return FlagsServiceStatus(
        service="flags", ready=True, flags=len(snapshot.flags), snapshot_version=snapshot.version
    )


# -- routing --------------------------------------------------------------------------------------


def cell_routes(deps: Deps) -> list[Route]:
    # The installed release is an attribute rules and version gates read.
    return [route(CellUpgrade, deps.store.fleet.on_upgrade), route(CellSync, on_cell_sync, deps)]


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(FlagsDelete, flags_delete, deps),
        route(FlagsList, flags_list, deps),
        route(FlagsShow, flags_show, deps),
        route(FlagsHistory, flags_history, deps),
        route(FlagsEval, flags_eval, deps),
        route(FlagsSnapshotShow, flags_snapshot, deps),
        route(FlagsPreview, flags_preview, deps),
        route(Status, status, deps),
    ]
