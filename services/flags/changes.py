"""Flag changes, now or later: a change is made at once unless it has a time (``--at``) or
changes the answer of a cell in a stage the service's ``approval_stages`` names (the two-person
rule: a second operator approves it, never the one who asked). A change kept for later is one
per flag; ``flags pending`` lists them, ``flags cancel`` drops one.

A timed change is made by ``run_due`` in whichever replica gets there first: the write that
makes it also removes it, and is refused if it is gone, so it is made once, across replicas and
a replica killed at any point.
"""

from __future__ import annotations

import logging
from datetime import datetime

from common.bus.errors import RpcFailure
from common.flags import Flag
from common.messages import Delivery
from common.requests.flags import (
    FlagChange,
    FlagsApprove,
    FlagsCancel,
    FlagsEnable,
    FlagsPending,
    FlagsSet,
    PendingChange,
)
from common.routes import Route, route
from services.flags import model
from services.flags.handlers import CHANGE_TRIES, Deps, actor_of
from services.flags.store import Conflict

log = logging.getLogger(__name__)


async def flips_in_approval_stages(flag: Flag, deps: Deps) -> int:
    """Cells of the approval stages whose answer ``flag`` would change (flags preview)."""
    if not deps.approval_stages:
        return 0
    current = await deps.store.snapshot()
    cells = await deps.store.fleet.groups()
    preview = model.preview(flag.key, current, model.proposed(current, flag), cells)
    return sum(c.cells for c in preview.changes if c.stage in deps.approval_stages)


async def make(
    flag: Flag, deps: Deps, *, actor: str, expected: str | None, pending: str | None = None
) -> FlagChange:
    """Write ``flag`` now, read as ``expected`` (and, with ``pending``, remove the pending
    change it makes, as read); Conflict if either moved."""
    version = await deps.store.change(
        flag.key, expected=expected, new=flag, actor=actor, at=deps.clock.now(), pending=pending
    )
    deps.changed()
    action = "created" if expected is None else "updated"
    return FlagChange(key=flag.key, changed=True, snapshot_version=version, action=action)


async def submit(flag: Flag, at: datetime | None, delivery: Delivery, deps: Deps) -> FlagChange:
    """``flags set`` (and enable/disable): now, or kept until its time or its approval."""
    now = deps.clock.now()
    if at is not None and at <= now:
        raise RpcFailure("invalid", f"at: {at.isoformat()} is in the past (now {now.isoformat()})")
    for _ in range(CHANGE_TRIES):
        raw = await deps.store.raw(flag.key)
        if raw is not None and Flag.model_validate_json(raw) == flag:
            version = await deps.store.version()
            return FlagChange(key=flag.key, changed=False, snapshot_version=version)
        flips = await flips_in_approval_stages(flag, deps)
        if at is None and not flips:
            try:
                return await make(flag, deps, actor=actor_of(delivery), expected=raw)
            except Conflict:
                continue
        pending = PendingChange(
            key=flag.key,
            flag=flag,
            base=raw,
            asked_by=actor_of(delivery),
            asked_at=now,
            at=at,
            approval="needed" if flips else "not_needed",
            flips=flips,
        )
        return await _keep(pending, deps)
    raise RpcFailure("busy", f"flag {flag.key} kept changing; try again")


async def _keep(pending: PendingChange, deps: Deps) -> FlagChange:
    flag = pending.flag
    held = await deps.store.pending_raw(flag.key)
    if held is not None:
        other = PendingChange.model_validate_json(held)
        raise RpcFailure(
            "conflict",
            f"flag {flag.key} has a pending change (asked by {other.asked_by}); flags cancel"
            f" {flag.key} drops it",
        )
    if not await deps.store.keep(pending, expected=None):
        raise RpcFailure("conflict", f"flag {flag.key} got a pending change meanwhile; look again")
    return FlagChange(
        key=flag.key,
        changed=False,
        snapshot_version=await deps.store.version(),
        waits=waits(pending),
    )


def waits(p: PendingChange) -> str:
    """What a pending change waits for, in words."""
    parts = []
    if p.approval == "needed":
        parts.append(
            f"approval by an operator other than {p.asked_by} (it changes the answer of"
            f" {p.flips} cell(s) in the approval stages): flags approve {p.key}"
        )
    if p.at is not None:
        parts.append(f"its time, {p.at.isoformat()}")
    return " and ".join(parts)


async def flags_set(req: FlagsSet, delivery: Delivery, deps: Deps) -> FlagChange:
    return await submit(req.flag, req.at, delivery, deps)


async def flags_enable(req: FlagsEnable, delivery: Delivery, deps: Deps) -> FlagChange:
    flag = await deps.store.get(req.key)
    if flag is None:
        raise RpcFailure("not_found", f"flag {req.key!r} does not exist")
    return await submit(flag.model_copy(update={"enabled": req.enabled}), req.at, delivery, deps)


async def flags_approve(req: FlagsApprove, delivery: Delivery, deps: Deps) -> FlagChange:
    raw = await deps.store.pending_raw(req.key)
    if raw is None:
        raise RpcFailure("not_found", f"flag {req.key} has no pending change")
    p = PendingChange.model_validate_json(raw)
    by = actor_of(delivery)
    if p.approval != "needed":
        raise RpcFailure("conflict", f"the pending change of {req.key} needs no approval")
    if by == p.asked_by:
        raise RpcFailure(
            "forbidden",
            f"{by} asked for this change of {req.key}: another operator must approve it"
            " (two-person rule)",
        )
    if await deps.store.raw(req.key) != p.base:
        raise RpcFailure(
            "conflict",
            f"flag {req.key} changed after this change was asked for; flags cancel {req.key}"
            " and ask again",
        )
    approved = p.model_copy(update={"approval": "approved", "approved_by": by})
    if p.at is not None and p.at > deps.clock.now():
        if not await deps.store.keep(approved, expected=raw):
            raise RpcFailure("conflict", f"the pending change of {req.key} changed; look again")
        version = await deps.store.version()
        return FlagChange(
            key=req.key, changed=False, snapshot_version=version, waits=waits(approved)
        )
    try:
        return await _make_pending(approved, raw, deps)
    except Conflict:
        raise RpcFailure("busy", f"flag {req.key} changed meanwhile; try again") from None


async def _make_pending(p: PendingChange, raw: str, deps: Deps) -> FlagChange:
    actor = p.asked_by + (f", approved by {p.approved_by}" if p.approved_by else "")
    expected = await deps.store.raw(p.key)
    return await make(p.flag, deps, actor=actor, expected=expected, pending=raw)


async def flags_cancel(req: FlagsCancel, delivery: Delivery, deps: Deps) -> PendingChange:
    raw = await deps.store.pending_raw(req.key)
    if raw is None or not await deps.store.drop(req.key, expected=raw):
        raise RpcFailure("not_found", f"flag {req.key} has no pending change")
    return PendingChange.model_validate_json(raw)


async def flags_pending(req: FlagsPending, delivery: Delivery, deps: Deps) -> list[PendingChange]:
    return await deps.store.pending()


async def run_due(deps: Deps) -> int:
    """Make every timed change whose time has come; how many were made here."""
    made = 0
    for key in await deps.store.due(deps.clock.now()):
        raw = await deps.store.pending_raw(key)
        if raw is None:
            continue  # made or cancelled by another replica just now
        try:
            await _make_pending(PendingChange.model_validate_json(raw), raw, deps)
            made += 1
        except Conflict:
            log.info("timed change of %s not made here (made elsewhere, or the flag moved)", key)
    return made


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(FlagsSet, flags_set, deps),
        route(FlagsEnable, flags_enable, deps),
        route(FlagsApprove, flags_approve, deps),
        route(FlagsCancel, flags_cancel, deps),
        route(FlagsPending, flags_pending, deps),
    ]
