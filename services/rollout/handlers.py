"""The rollout service's handlers. So far: publishing and reading releases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common.bus import RpcFailure
from common.clock import Clock
from common.messages import Delivery, ReleasePublished
from services.rollout.model import ReleaseFile, VersionRef, newest_first
from services.rollout.store import RolloutStore


@dataclass(frozen=True)
class Deps:
    store: RolloutStore
    clock: Clock


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


async def status(params: dict[str, Any], delivery: Delivery, *, deps: Deps) -> dict[str, Any]:
    return {"service": "rollout", "ready": True, "releases": len(await deps.store.versions())}


RPC: dict[str, Callable[..., Awaitable[Any]]] = {
    "release.publish": release_publish,
    "release.list": release_list,
    "release.show": release_show,
    "status": status,
}
