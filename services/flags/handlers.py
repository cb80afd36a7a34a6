"""The flags service's handlers: flag definitions and their audit log, central evaluation, the
preview of a change over the fleet, the cell facts it keeps from the registry's events, and
answering a cell's sync with the current snapshot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.bus import RpcFailure, refuse_foreign_sender
from common.clock import Clock
from common.flags import KEY_PATTERN, Flag, Snapshot
from common.messages import (
    CellCreated,
    CellDecommissioned,
    CellOffline,
    CellOnline,
    CellRegistered,
    CellRegistrationRefused,
    CellSync,
    CellUpgrade,
    Delivery,
    Event,
    Message,
)
from services.flags import metrics
from services.flags.store import Conflict, FlagsStore


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


class KeyRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(pattern=KEY_PATTERN)


class EvalRequest(BaseModel):
    """``cell``: a cell the service knows; or ``attributes``: a context given in full."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    cell: str | None = None
    attributes: dict[str, Any] | None = None
    default: Any = None


def _actor(delivery: Delivery) -> str:
    return delivery.user_id or "unknown"


# -- definitions ----------------------------------------------------------------------------------


async def flags_set(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    flag = Flag.model_validate(params.get("flag"))
    for _ in range(5):
        raw = await deps.store.raw(flag.key)
        if raw is not None and Flag.model_validate_json(raw) == flag:
            version = await deps.store.version()
            return {"key": flag.key, "changed": False, "snapshot_version": version}
        try:
            version = await deps.store.change(
                flag.key, expected=raw, new=flag, actor=_actor(delivery), at=deps.clock.now()
            )
        except Conflict:
            continue
        deps.changed()
        return {"key": flag.key, "changed": True, "snapshot_version": version,
                "action": "created" if raw is None else "updated"}  # fmt: skip
    raise RpcFailure("busy", f"flag {flag.key} kept changing; try again")


async def flags_delete(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = KeyRef.model_validate(params)
    for _ in range(5):
        raw = await deps.store.raw(ref.key)
        if raw is None:
            raise RpcFailure("not_found", f"flag {ref.key!r} does not exist")
        try:
            version = await deps.store.change(
                ref.key, expected=raw, new=None, actor=_actor(delivery), at=deps.clock.now()
            )
        except Conflict:
            continue
        deps.changed()
        return {"key": ref.key, "deleted": True, "snapshot_version": version}
    raise RpcFailure("busy", f"flag {ref.key} kept changing; try again")


async def flags_list(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> list[Any]:
    snapshot = await deps.store.snapshot()
    return [
        {"key": f.key, "owner": f.owner, "enabled": f.enabled, "default_variant": f.default_variant,
         "rules": len(f.rules), "requires_release": f.requires_release,
         "description": f.description}
        for f in (snapshot.flags[k] for k in sorted(snapshot.flags))
    ]  # fmt: skip


async def flags_show(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = KeyRef.model_validate(params)
    flag = await deps.store.get(ref.key)
    if flag is None:
        raise RpcFailure("not_found", f"flag {ref.key!r} does not exist")
    return {**flag.model_dump(mode="json"), "snapshot_version": await deps.store.version()}


async def flags_history(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> list[Any]:
    ref = KeyRef.model_validate(params)
    history = await deps.store.history(ref.key)
    if not history:
        raise RpcFailure("not_found", f"flag {ref.key!r} has no history")
    return history


# -- evaluation -----------------------------------------------------------------------------------


async def flags_eval(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    req = EvalRequest.model_validate(params)
    if (req.cell is None) == (req.attributes is None):
        raise RpcFailure("invalid", "give exactly one of cell (an id) or attributes")
    if req.cell is not None:
        attributes = await deps.store.cell(req.cell)
        if attributes is None:
            raise RpcFailure("not_found", f"the flags service knows no cell {req.cell!r}")
    else:
        attributes = req.attributes
    assert attributes is not None
    snapshot = await deps.store.snapshot()
    answer = snapshot.evaluate(req.key, attributes, req.default)
    metrics.evaluated(req.key, answer.reason)
    return answer.as_json()


async def flags_snapshot(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    snapshot = await deps.store.snapshot()
    return {"version": snapshot.version, "flags": snapshot.to_wire()}


def preview(
    key: str, current: Snapshot, proposed: Snapshot, cells: list[dict[str, str | None]]
) -> dict[str, Any]:
    """Which cells would flip, and how, if ``proposed`` replaced ``current``: counts of
    (stage, org, from variant, to variant) for every cell whose variant changes."""
    flips: Counter[tuple[str, str, str, str]] = Counter()
    considered = 0
    for cell in cells:
        if cell.get("status") == "decommissioned":
            continue
        considered += 1
        before = current.evaluate(key, cell)
        after = proposed.evaluate(key, cell)
        if before.variant != after.variant:
            flips[(cell.get("stage") or "-", cell.get("org") or "-",
                   before.variant or "(none)", after.variant or "(none)")] += 1  # fmt: skip
    by_stage: dict[str, Counter[str]] = {}
    by_org: dict[str, Counter[str]] = {}
    for (stage, org, was, becomes), n in flips.items():
        by_stage.setdefault(stage, Counter())[f"{was} -> {becomes}"] += n
        by_org.setdefault(org, Counter())[f"{was} -> {becomes}"] += n
    return {
        "key": key,
        "cells": considered,
        "flipping": sum(flips.values()),
        "by_stage": {s: dict(c) for s, c in sorted(by_stage.items())},
        "by_org": {o: dict(c) for o, c in sorted(by_org.items())},
        "changes": [
            {"stage": s, "org": o, "from": b, "to": a, "cells": n}
            for (s, o, b, a), n in sorted(flips.items())
        ],
    }


async def flags_preview(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    """Nothing is written: what ``flags set`` of this flag would change, cell by cell."""
    flag = Flag.model_validate(params.get("flag"))
    current = await deps.store.snapshot()
    proposed = Snapshot(current.version + 1, {**current.flags, flag.key: flag})
    return preview(flag.key, current, proposed, await deps.store.cells())


# -- what the flags service knows of cells --------------------------------------------------------


async def on_cell_created(msg: CellCreated, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, stage=msg.stage, region=msg.region,
                               org=msg.org, status="created")  # fmt: skip


async def on_cell_registered(msg: CellRegistered, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(
        msg.cell_id, msg.at, stage=msg.stage, region=msg.region, org=msg.org, status="online",
        agent_version=msg.agent_version, installed_release=msg.installed_release or "",
    )  # fmt: skip


async def on_cell_offline(msg: CellOffline, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, status="offline")


async def on_cell_online(msg: CellOnline, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, status="online")


async def on_cell_decommissioned(
    msg: CellDecommissioned, delivery: Delivery, *, deps: Deps
) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, status="decommissioned")


async def on_ignored_event(msg: Event, delivery: Delivery, *, deps: Deps) -> None:
    """Events on the flags queue it has no use for (acked, not dead-lettered)."""


async def on_cell_upgrade(msg: CellUpgrade, delivery: Delivery, *, deps: Deps) -> None:
    """A cell's installed release is an attribute rules and version gates read."""
    refuse_foreign_sender(msg, delivery)
    if msg.phase == "succeeded":
        await deps.store.cell_fact(msg.cell_id, msg.sent_at,
                                   installed_release=msg.release_version or "")  # fmt: skip


async def on_cell_sync(msg: CellSync, delivery: Delivery, *, deps: Deps) -> None:
    """A cell whose snapshot is older than the current one (or that has none) is sent it: how
    a change made while the cell was offline reaches it."""
    refuse_foreign_sender(msg, delivery)
    snapshot = await deps.store.snapshot()
    held = msg.flags_snapshot_version
    if held is not None and held >= snapshot.version:
        return
    if deps.send_snapshot is not None:
        await deps.send_snapshot(msg.cell_id, snapshot)


async def status(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    snapshot = await deps.store.snapshot()
    return {"service": "flags", "ready": True, "flags": len(snapshot.flags),
            "snapshot_version": snapshot.version}  # fmt: skip


EVENTS: dict[type[Message], Callable[..., Awaitable[None]]] = {
    CellCreated: on_cell_created,
    CellRegistered: on_cell_registered,
    CellOffline: on_cell_offline,
    CellOnline: on_cell_online,
    CellDecommissioned: on_cell_decommissioned,
    CellRegistrationRefused: on_ignored_event,
}

CELL_REPORTS: dict[type[Message], Callable[..., Awaitable[None]]] = {
    CellUpgrade: on_cell_upgrade,
    CellSync: on_cell_sync,
}

RPC: dict[str, Callable[..., Awaitable[Any]]] = {
    "flags.set": flags_set,
    "flags.delete": flags_delete,
    "flags.list": flags_list,
    "flags.show": flags_show,
    "flags.history": flags_history,
    "flags.eval": flags_eval,
    "flags.snapshot": flags_snapshot,
    "flags.preview": flags_preview,
    "status": status,
}
