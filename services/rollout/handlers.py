"""The rollout service's handlers: releases, what it knows of cells, and the plan of a rollout.
The controller that carries a plan out is not built yet."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.bus import Refused, RpcFailure
from common.clock import Clock
from common.messages import (
    CellCreated,
    CellDecommissioned,
    CellOffline,
    CellOnline,
    CellRegistered,
    CellRegistrationRefused,
    CellReport,
    CellSync,
    CellUpgrade,
    Delivery,
    Event,
    InfraComplianceChanged,
    Message,
    ReleasePublished,
    sender_problem,
)
from services.rollout.model import (
    CellFacts,
    ReleaseFile,
    VersionRef,
    WavePolicy,
    newest_first,
    plan,
)
from services.rollout.store import RolloutStore


@dataclass(frozen=True)
class Deps:
    store: RolloutStore
    clock: Clock
    policy: WavePolicy = field(default_factory=WavePolicy)


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    release = record["release"]
    return {
        "version": release["version"],
        "components": len(release["components"]),
        "requires_maintenance": any(c["requires_maintenance"] for c in release["components"]),
        "reversible": release["reversible"],
        "published_at": record["published_at"],
        "published_by": record["published_by"],
    }


async def release_publish(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    release = ReleaseFile.model_validate(params.get("release")).release()
    now = deps.clock.now()
    by = delivery.user_id or "unknown"
    published = await deps.store.publish(
        release, at=now, by=by, event=ReleasePublished(at=now, release=release)
    )
    if not published:
        raise RpcFailure(
            "exists", f"release {release.version} is already published; publish a new version"
        )
    record = await deps.store.get(release.version)
    assert record is not None
    return {**_summary(record), "release": record["release"]}


async def release_list(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> list[Any]:
    records = [await deps.store.get(v) for v in newest_first(await deps.store.versions())]
    return [_summary(r) for r in records if r is not None]


async def release_show(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = VersionRef.model_validate(params)
    record = await deps.store.get(ref.version)
    if record is None:
        raise RpcFailure("not_found", f"release {ref.version!r} is not published")
    return {**_summary(record), "release": record["release"]}


# -- what rollout knows of cells ----------------------------------------------------------------


async def on_cell_created(msg: CellCreated, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, stage=msg.stage, status="created")


async def on_cell_registered(msg: CellRegistered, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(
        msg.cell_id, msg.at, stage=msg.stage, status="online",
        installed_release=msg.installed_release or "",
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
    """Events on rollout's queue that it has no use for yet (acked, not dead-lettered)."""


def _check_sender(msg: CellReport, delivery: Delivery) -> None:
    problem = sender_problem(msg, delivery)
    if problem is not None:
        raise Refused(problem[1])


async def on_cell_upgrade(msg: CellUpgrade, delivery: Delivery, *, deps: Deps) -> None:
    _check_sender(msg, delivery)
    if msg.phase == "succeeded" and msg.release_version is not None:
        await deps.store.set_installed(msg.cell_id, msg.release_version)


async def on_cell_sync(msg: CellSync, delivery: Delivery, *, deps: Deps) -> None:
    """Answered with the cell's desired state once the rollout controller exists; until then
    only the sender is checked."""
    _check_sender(msg, delivery)


async def rollout_plan(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = VersionRef.model_validate(params)
    if await deps.store.get(ref.version) is None:
        raise RpcFailure("not_found", f"release {ref.version!r} is not published")
    facts = [
        CellFacts(
            id=c["id"], stage=c["stage"], status=c["status"],
            installed_release=c.get("installed_release") or None,
        )
        for c in await deps.store.cells()
    ]  # fmt: skip
    return plan(ref.version, facts, deps.policy).model_dump(mode="json")


async def status(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    return {"service": "rollout", "ready": True, "releases": len(await deps.store.versions())}


EVENTS: dict[type[Message], Callable[..., Awaitable[None]]] = {
    CellCreated: on_cell_created,
    CellRegistered: on_cell_registered,
    CellOffline: on_cell_offline,
    CellOnline: on_cell_online,
    CellDecommissioned: on_cell_decommissioned,
    CellRegistrationRefused: on_ignored_event,
    InfraComplianceChanged: on_ignored_event,
}

CELL_REPORTS: dict[type[Message], Callable[..., Awaitable[None]]] = {
    CellUpgrade: on_cell_upgrade,
    CellSync: on_cell_sync,
}

RPC: dict[str, Callable[..., Awaitable[Any]]] = {
    "release.publish": release_publish,
    "release.list": release_list,
    "release.show": release_show,
    "rollout.plan": rollout_plan,
    "status": status,
}
