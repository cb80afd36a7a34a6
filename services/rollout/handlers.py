"""The rollout service's handlers: releases, the policy, what it knows of cells, operators'
views and actions. The controller (controller.py) carries rollouts out; handlers only record
facts and operators' decisions and wake it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from common.bus import RpcFailure, refuse_foreign_sender
from common.clock import Clock
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
    DesiredState,
    Event,
    InfraComplianceChanged,
    Message,
    ReleasePublished,
)
from services.rollout import metrics
from services.rollout.model import (
    ACTIVE,
    ActionRefused,
    CellFacts,
    ReleaseFile,
    Rollout,
    RolloutPolicy,
    VersionRef,
    abort,
    explain,
    new_rollout,
    newer,
    newest_first,
    pause,
    plan,
    resume,
    stage_counts,
)
from services.rollout.store import RolloutStore, Stale


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Deps:
    store: RolloutStore
    clock: Clock
    # Wakes the controller when something it decides on changed.
    wake: Callable[[], None] = _nothing
    # Publishes a command to a cell (a desired state re-sent on sync).
    send: Callable[[Message], Awaitable[None]] | None = None


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
        release, at=now, by=by, event=ReleasePublished(at=now, release=release),
        rollout=new_rollout(release, now),
    )  # fmt: skip
    if not published:
        raise RpcFailure(
            "exists", f"release {release.version} is already published; publish a new version"
        )
    record = await deps.store.get(release.version)
    assert record is not None
    deps.wake()
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
    deps.wake()  # its first install, or whatever it missed


async def on_cell_offline(msg: CellOffline, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, status="offline")
    deps.wake()


async def on_cell_online(msg: CellOnline, delivery: Delivery, *, deps: Deps) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, status="online")
    deps.wake()  # an offline cell skipped by its wave is updated now


async def on_infra_compliance(
    msg: InfraComplianceChanged, delivery: Delivery, *, deps: Deps
) -> None:
    """A cell past its infrastructure deadline is held: it gets no application update until
    it is compliant again, and then it is brought up to date."""
    held = "1" if msg.status == "out_of_sla" else "0"
    await deps.store.cell_fact(msg.cell_id, msg.at, held=held)
    deps.wake()


async def on_cell_decommissioned(
    msg: CellDecommissioned, delivery: Delivery, *, deps: Deps
) -> None:
    await deps.store.cell_fact(msg.cell_id, msg.at, status="decommissioned")


async def on_ignored_event(msg: Event, delivery: Delivery, *, deps: Deps) -> None:
    """Events on rollout's queue that it has no use for yet (acked, not dead-lettered)."""


TERMINAL = ("succeeded", "failed", "rolled_back")


async def on_cell_upgrade(msg: CellUpgrade, delivery: Delivery, *, deps: Deps) -> None:
    refuse_foreign_sender(msg, delivery)
    recorded = await deps.store.report(
        msg.cell_id, generation=msg.generation, phase=msg.phase, error=msg.error,
        at=deps.clock.now(), version=msg.release_version,
    )  # fmt: skip
    if recorded is None or msg.phase not in TERMINAL:
        return
    if recorded.desired_at is not None:
        took = (deps.clock.now() - recorded.desired_at).total_seconds()
        metrics.UPGRADE_DURATION.labels(msg.phase).observe(max(took, 0.0))
    deps.wake()


async def on_cell_sync(msg: CellSync, delivery: Delivery, *, deps: Deps) -> None:
    """A cell asks for its desired state (after a reconnect, at start, periodically): sent
    again if it has not applied it. Level-triggered, so a copy it already has is harmless."""
    refuse_foreign_sender(msg, delivery)
    cell = await deps.store.cell(msg.cell_id)
    if cell is None or cell.desired_generation is None:
        deps.wake()  # nothing sent yet: perhaps its first install is due
        return
    if msg.applied_generation is not None and msg.applied_generation >= cell.desired_generation:
        return
    release = await deps.store.release(cell.desired_version)
    if deps.send is not None:
        await deps.send(
            DesiredState(
                cell_id=cell.id, issued_at=deps.clock.now(), generation=cell.desired_generation,
                release=release,
            )
        )  # fmt: skip


async def rollout_plan(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = VersionRef.model_validate(params)
    if await deps.store.get(ref.version) is None:
        raise RpcFailure("not_found", f"release {ref.version!r} is not published")
    policy = await deps.store.policy()
    return plan(ref.version, await deps.store.cells(), policy.waves).model_dump(mode="json")


async def status(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    rollouts = await deps.store.rollouts()
    return {
        "service": "rollout",
        "ready": True,
        "releases": len(rollouts),
        "active": sorted(r.version for r in rollouts if r.state in ACTIVE),
        "halted": sorted(r.version for r in rollouts if r.state == "halted"),
    }


# -- operators' views and actions on rollouts -----------------------------------------------------


def _rollout_view(
    r: Rollout, cells: list[CellFacts], policy: RolloutPolicy, now: datetime
) -> dict[str, Any]:
    waves = r.waves or ()
    return {
        "version": r.version,
        "state": r.state,
        "stage": r.stage,
        # 1-based for people: "wave 2 of 4"; the canary is wave 1 when there is one.
        "wave": r.wave + 1 if waves else None,
        "waves": len(waves),
        "soak_until": r.soak_until.isoformat() if r.soak_until else None,
        "halt": r.halt.model_dump(mode="json") if r.halt else None,
        "reversible": r.reversible,
        "started_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
        "stages": stage_counts(r, cells, policy, now),
    }


async def _views(deps: Deps, rollouts: list[Rollout]) -> list[dict[str, Any]]:
    cells, policy, now = await deps.store.cells(), await deps.store.policy(), deps.clock.now()
    return [_rollout_view(r, cells, policy, now) for r in rollouts]


async def _known_cell(deps: Deps, cell_id: str) -> CellFacts:
    cell = await deps.store.cell(cell_id)
    if cell is None:
        raise RpcFailure("not_found", f"rollout knows no cell {cell_id!r}")
    return cell


async def _rollout(deps: Deps, params: dict[str, Any]) -> Rollout:
    ref = VersionRef.model_validate(params)
    r = await deps.store.rollout(ref.version)
    if r is None:
        raise RpcFailure("not_found", f"release {ref.version!r} is not published")
    return r


async def rollout_status(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    """One rollout's state and per-stage counts; with no version, the newest release's."""
    if params.get("version"):
        r = await _rollout(deps, params)
    else:
        rollouts = await deps.store.rollouts()
        if not rollouts:
            raise RpcFailure("not_found", "no release has been published yet")
        r = max(rollouts, key=lambda r: r.semver)
    return (await _views(deps, [r]))[0]


async def rollout_list(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> list[Any]:
    rollouts = sorted(await deps.store.rollouts(), key=lambda r: r.semver, reverse=True)
    return await _views(deps, rollouts)


async def _act(
    params: dict[str, Any], deps: Deps, action: Callable[[Rollout, datetime], Rollout]
) -> dict[str, Any]:
    for _ in range(5):  # the controller may write between our read and our write
        r = await _rollout(deps, params)
        try:
            new = action(r, deps.clock.now())
        except ActionRefused as exc:
            raise RpcFailure("conflict", str(exc)) from None
        try:
            await deps.store.save_rollout(new, r.rev)
        except Stale:
            continue
        deps.wake()
        return (await _views(deps, [new]))[0]
    raise RpcFailure("busy", "the rollout kept changing; try again")


async def rollout_pause(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    return await _act(params, deps, pause)


async def rollout_resume(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    return await _act(params, deps, resume)


async def rollout_abort(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    return await _act(params, deps, abort)


class CellRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    version: str | None = None


async def rollout_explain(
    params: dict[str, Any], delivery: Delivery, *, deps: Deps
) -> dict[str, Any]:
    ref = CellRef.model_validate(params)
    cell = await _known_cell(deps, ref.id)
    policy, rollouts = await deps.store.policy(), await deps.store.rollouts()
    reason, sentence, version = explain(cell, rollouts, policy, deps.clock.now())
    return {
        "cell": cell.id, "stage": cell.stage, "status": cell.status, "reason": reason,
        "explanation": sentence, "release": version, "installed_release": cell.installed_release,
        "desired_release": cell.desired_version, "desired_generation": cell.desired_generation,
        "pinned": cell.pinned, "held": cell.held,
    }  # fmt: skip


async def cell_pin(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    """Keep a cell on one release: it is sent that release if it is not on it, and no rollout
    moves it until it is unpinned. A pin never takes a cell backwards."""
    ref = CellRef.model_validate(params)
    if ref.version is None:
        raise RpcFailure("invalid", "version: a release to pin the cell to is required")
    cell = await _known_cell(deps, ref.id)
    if await deps.store.get(ref.version) is None:
        raise RpcFailure("not_found", f"release {ref.version!r} is not published")
    if newer(cell.installed_release, ref.version):
        raise RpcFailure(
            "conflict",
            f"{ref.id} runs {cell.installed_release}, newer than {ref.version}; a cell never "
            "goes backwards (pin it to its current release or a newer one)",
        )
    await deps.store.set_pin(ref.id, ref.version)
    deps.wake()
    return {"cell": ref.id, "pinned": ref.version, "installed_release": cell.installed_release}


async def cell_unpin(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    ref = CellRef.model_validate(params)
    cell = await _known_cell(deps, ref.id)
    await deps.store.set_pin(ref.id, None)
    deps.wake()
    return {"cell": ref.id, "pinned": None, "installed_release": cell.installed_release}


async def policy_show(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    return (await deps.store.policy()).model_dump(mode="json")


async def policy_set(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    """Replace the policy (keys left out take their defaults); running rollouts follow it from
    their next step."""
    policy = RolloutPolicy.model_validate(params.get("policy"))
    await deps.store.set_policy(policy)
    deps.wake()
    return policy.model_dump(mode="json")


EVENTS: dict[type[Message], Callable[..., Awaitable[None]]] = {
    CellCreated: on_cell_created,
    CellRegistered: on_cell_registered,
    CellOffline: on_cell_offline,
    CellOnline: on_cell_online,
    CellDecommissioned: on_cell_decommissioned,
    CellRegistrationRefused: on_ignored_event,
    InfraComplianceChanged: on_infra_compliance,
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
    "rollout.status": rollout_status,
    "rollout.list": rollout_list,
    "rollout.pause": rollout_pause,
    "rollout.resume": rollout_resume,
    "rollout.abort": rollout_abort,
    "rollout.explain": rollout_explain,
    "rollout.policy.show": policy_show,
    "rollout.policy.set": policy_set,
    "cells.pin": cell_pin,
    "cells.unpin": cell_unpin,
    "status": status,
}
