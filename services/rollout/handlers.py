"""The rollout service's handlers: releases, the policy, what it knows of cells, operators'
views and actions. The controller (controller.py) carries rollouts out; handlers only record
facts and operators' decisions and wake it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from common.bus.errors import Refused, RpcFailure, refuse_foreign_sender
from common.clock import Clock
from common.messages import CellSync, CellUpgrade, Delivery, DesiredState, Message, ReleasePublished
from common.metrics import cell_messages_refused
from common.releases import Release
from common.requests import ServiceStatus, Status
from common.requests.rollout import (
    CellsPin,
    CellsUnpin,
    Explanation,
    Pin,
    Plan,
    PolicySet,
    PolicyShow,
    ReleaseList,
    ReleasePublish,
    ReleaseRecord,
    ReleaseShow,
    ReleaseSummary,
    RolloutAbort,
    RolloutApprove,
    RolloutExplain,
    RolloutList,
    RolloutPause,
    RolloutPlan,
    RolloutPolicy,
    RolloutPromote,
    RolloutResume,
    RolloutRetry,
    RolloutSchedule,
    RolloutServiceStatus,
    RolloutShow,
    RolloutView,
    StageCounts,
)
from common.routes import Route, route
from common.vocabulary import ACTIVE_STATES, FAILED_PHASES, TERMINAL_PHASES
from services.rollout import metrics
from services.rollout.model import (
    STAGE_ORDER,
    ActionRefused,
    CellFacts,
    Rollout,
    abort,
    approve,
    explain,
    health_for,
    new_rollout,
    newer,
    newest_first,
    pause,
    plan,
    predict,
    promote,
    required_versions,
    resume,
    retry,
    schedule,
)
from services.rollout.model.tally import Tally
from services.rollout.store import Counted, Published, RolloutStore, Stale


def _nothing() -> None:
    pass


def _no_count(*, failed: bool) -> None:
    pass


@dataclass(frozen=True)
class Deps:
    store: RolloutStore
    clock: Clock
    # Wakes the controller when something it decides on changed.
    wake: Callable[[], None] = _nothing
    # Counts a cell's upgrade outcome towards the wave it may finish (failed: step soon).
    outcome: Callable[..., None] = _no_count
    # Publishes a command to a cell (a desired state re-sent on sync).
    send: Callable[[Message], Awaitable[None]] | None = None
    # Decides a customer's deferral, which comes in a sync (services/rollout/deferrals.py).
    defer: Callable[[CellSync, Delivery], Awaitable[None]] | None = None
    # The views' own counts over every cell under way, by the releases they count (_views).
    counting: dict[tuple[str, ...], asyncio.Task[Counted]] = field(default_factory=dict)


# -- releases -------------------------------------------------------------------------------------


def _summary(p: Published) -> ReleaseSummary:
    release = p.release
    return ReleaseSummary(
        version=release.version,
        components=len(release.components),
        requires_maintenance=any(c.requires_maintenance for c in release.components),
        reversible=release.reversible,
        published_at=p.published_at,
        published_by=p.published_by,
    )


async def _record(deps: Deps, version: str) -> ReleaseRecord:
    published = await deps.store.get(version)
    if published is None:
        raise RpcFailure("not_found", f"release {version!r} is not published")
    return ReleaseRecord(**dict(_summary(published)), release=published.release)


async def publish_problem(version: str, deps: Deps) -> tuple[str, str] | None:
    """Why a release of ``version`` cannot be published, as (code, message), or None."""
    versions = await deps.store.versions()
    if version in versions:
        return "exists", f"release {version} is already published; publish a new version"
    newest = newest_first(versions)[0] if versions else None
    if newest is not None and newer(newest, version):
        return (
            "conflict",
            f"release {version} is older than {newest}, the newest published: no cell goes"
            f" backwards, so it would reach none; publish a version newer than {newest}",
        )
    return None


async def release_publish(req: ReleasePublish, delivery: Delivery, deps: Deps) -> ReleaseRecord:
    release = req.release.release()
    problem = await publish_problem(release.version, deps)
    if problem is not None:
        raise RpcFailure(*problem)
    now = deps.clock.now()
    if req.starts_at is not None and req.starts_at <= now:
        raise RpcFailure(
            "invalid", f"starts_at: {req.starts_at.isoformat()} is in the past (now {now})"
        )
    by = delivery.user_id or "unknown"
    published = await deps.store.publish(
        release,
        at=now,
        by=by,
        event=ReleasePublished(at=now, release=release),
        rollout=new_rollout(
            release,
            now,
            by=by,
            starts_at=req.starts_at,
            security_deadline=timedelta(days=(await deps.store.policy()).security_deadline_days),
        ),
    )
    if not published:
        raise RpcFailure(
            "exists", f"release {release.version} is already published; publish a new version"
        )
    deps.wake()
    return await _record(deps, release.version)


async def release_list(req: ReleaseList, delivery: Delivery, deps: Deps) -> list[ReleaseSummary]:
    records = [await deps.store.get(v) for v in newest_first(await deps.store.versions())]
    return [_summary(r) for r in records if r is not None]


async def release_show(req: ReleaseShow, delivery: Delivery, deps: Deps) -> ReleaseRecord:
    return await _record(deps, req.version)


# -- what rollout hears from cells ----------------------------------------------------------------


async def report_problem(msg: CellUpgrade, deps: Deps) -> tuple[str, str] | None:
    """Why an upgrade report cannot be about what rollout sent the cell, as (reason, message),
    or None. A cell reports on the generations it was sent, the newest with the release sent
    with it; an earlier one's release is at least a published one. (The generation sent only
    grows, and is written before the command goes out: a report valid when read stays valid.)"""
    generation, version = await deps.store.sent(msg.cell_id)
    if generation is None or msg.generation > generation:
        return "generation_not_sent", f"generation {msg.generation} was never sent to the cell"
    if msg.generation == generation and msg.release_version != version:
        return (
            "release_not_sent",
            f"generation {generation} carried release {version!r}, not {msg.release_version!r}",
        )
    if msg.release_version is not None and await deps.store.release(msg.release_version) is None:
        return "release_not_sent", f"release {msg.release_version!r} was never published"
    return None


async def on_cell_upgrade(msg: CellUpgrade, delivery: Delivery, deps: Deps) -> None:
    """A cell's progress on a desired state rollout sent it: only what was sent counts (a
    canary reporting success for a release it was never offered would move every other
    customer's rollout on)."""
    refuse_foreign_sender(msg, delivery)
    problem = await report_problem(msg, deps)
    if problem is not None:
        cell_messages_refused().labels(problem[0]).inc()
        raise Refused(f"upgrade report refused: {problem[1]}")
    recorded = await deps.store.upgrade(msg, deps.clock.now())
    if recorded is None or msg.phase not in TERMINAL_PHASES:
        return
    if recorded.desired_at is not None:
        took = (deps.clock.now() - recorded.desired_at).total_seconds()
        metrics.UPGRADE_DURATION.labels(msg.phase).observe(max(took, 0.0))
    deps.outcome(failed=msg.phase in FAILED_PHASES)


async def on_cell_sync(msg: CellSync, delivery: Delivery, deps: Deps) -> None:
    """A cell asks for its desired state (after a reconnect, at start, periodically): sent
    again if it has not applied it. Level-triggered, so a copy it already has is harmless."""
    refuse_foreign_sender(msg, delivery)
    if msg.reason == "defer":
        if deps.defer is not None:
            await deps.defer(msg, delivery)
        return
    cell = await deps.store.cell(msg.cell_id)
    if cell is None or cell.desired_generation is None:
        # Nothing sent yet: a first install, if one is due, comes with the next step (as for
        # a registration, the tick: see Controller.wake).
        return
    if msg.applied_generation is not None and msg.applied_generation >= cell.desired_generation:
        return
    release = await deps.store.release(cell.desired_version)
    health = health_for(release, await deps.store.policy(), cell.stage)
    if deps.send is not None:
        await deps.send(
            DesiredState(
                cell_id=cell.id,
                issued_at=deps.clock.now(),
                generation=cell.desired_generation,
                release=release,
                health=health,
            )
        )


# -- operators' views -----------------------------------------------------------------------------


async def rollout_plan(req: RolloutPlan, delivery: Delivery, deps: Deps) -> Plan:
    """A published release's plan, or (``release``) a release file's before it is published:
    its waves, each cell's path, its checks and bakes, and whether publishing would be
    refused."""
    policy, rollouts = await deps.store.policy(), await deps.store.rollouts()
    refused = None
    release: Release | None
    if req.release is not None:
        release = req.release.release()
        problem = await publish_problem(release.version, deps)
        refused = problem[1] if problem else None
        # As if published: a required one is a step on its own cells' paths.
        rollouts = [r for r in rollouts if r.version != release.version]
        rollouts.append(new_rollout(release, deps.clock.now()))
    else:
        release = await deps.store.release(req.version)
        if release is None:
            raise RpcFailure("not_found", f"release {req.version!r} is not published")
    required = required_versions(rollouts)
    cells = await deps.store.cells()
    result = plan(release.version, cells, policy.waves, required)
    windows, now = await deps.store.windows(policy, rollouts), deps.clock.now()
    not_before = {
        c.id: opens.isoformat()
        for c in cells
        if (opens := windows.opens(c, release.version, now)) is not None
    }
    health = {stage: health_for(release, policy, stage) for stage in STAGE_ORDER}
    checks = next((h.checks for h in health.values() if h is not None), ())
    bakes = {s: h.bake_seconds for s, h in health.items() if h is not None}
    own = next((r for r in rollouts if r.version == release.version), None)
    predicted, gated = predict(
        result,
        cells,
        policy,
        windows,
        now,
        bakes=bakes,
        starts_at=dict(own.starts_at) if own else None,
        approved=[stage for stage, _ in own.approved] if own else (),
    )
    return result.model_copy(
        update={
            "refused": refused,
            "checks": [str(c.get("name")) for c in checks],
            "bake_seconds": bakes,
            "not_before": not_before,
            "predicted": {c: t.isoformat() for c, t in predicted.items()},
            "waits_for_approval": gated,
        }
    )


async def status(req: Status, delivery: Delivery, deps: Deps) -> ServiceStatus:
    rollouts = await deps.store.rollouts()
    return RolloutServiceStatus(
        service="rollout",
        ready=True,
        releases=len(rollouts),
        active=sorted(r.version for r in rollouts if r.state in ACTIVE_STATES),
        halted=sorted(r.version for r in rollouts if r.state == "halted"),
    )


def _rollout_view(r: Rollout, counted: Counted, now: datetime) -> RolloutView:
    waves = r.waves or ()
    late = r.deadline is not None and now >= r.deadline
    return RolloutView(
        version=r.version,
        state=r.state,
        stage=r.stage,
        wave=r.wave + 1 if waves else None,
        waves=len(waves),
        soak_until=r.soak_until.isoformat() if r.soak_until else None,
        halt=r.halt,
        reversible=r.reversible,
        started_at=r.created_at.isoformat(),
        updated_at=r.updated_at.isoformat(),
        stages={stage: StageCounts(**n) for stage, n in counted.counts[r.version].items()},
        waiting=r.waiting,
        published_by=r.published_by,
        approved=dict(r.approved),
        starts_at={stage: at.isoformat() for stage, at in r.starts_at},
        deferred={
            cell_id: until.isoformat()
            for cell_id, (until, runs) in sorted(counted.deferred.items())
            if now < until and not late and r.version != runs
        },
        deadline=r.deadline.isoformat() if r.deadline else None,
        counted_at=counted.at.isoformat(),
    )


async def _views(deps: Deps, rollouts: list[Rollout]) -> list[RolloutView]:
    """The rollouts with their counts: the leading controller's, kept as cells change
    (model.tally); while no controller leads, or it has not counted a release yet, counted
    here over every cell the same way."""
    now = deps.clock.now()
    counted = await deps.store.tally()
    if counted is None or any(r.version not in counted.counts for r in rollouts):
        # Views asked together share one count: after a restart at 100,000 cells each took
        # seconds of reading the fleet, until the new leader had counted.
        versions = tuple(sorted({r.version for r in rollouts}))
        task = deps.counting.get(versions)
        if task is None:
            task = deps.counting[versions] = asyncio.create_task(_count(deps, versions))
            task.add_done_callback(lambda _: deps.counting.pop(versions, None))
        counted = await asyncio.shield(task)
    return [_rollout_view(r, counted, now) for r in rollouts]


async def _count(deps: Deps, versions: tuple[str, ...]) -> Counted:
    """The releases' counts over every cell, as the controller keeps them."""
    now = deps.clock.now()
    tally = Tally(await deps.store.policy())
    tally.reset([], versions, now)
    # Counted as the cells are read, a chunk at a time: not a second copy of the fleet
    # beside the controller's while it loads its own.
    await deps.store.each_cell(lambda cell: tally.update(None, cell, now))
    return Counted(tally.counts, tally.deferred, now)


async def known_cell(deps: Deps, cell_id: str) -> CellFacts:
    cell = await deps.store.cell(cell_id)
    if cell is None:
        raise RpcFailure("not_found", f"rollout knows no cell {cell_id!r}")
    return cell


async def _rollout(deps: Deps, version: str) -> Rollout:
    r = await deps.store.rollout(version)
    if r is None:
        raise RpcFailure("not_found", f"release {version!r} is not published")
    return r


async def rollout_status(req: RolloutShow, delivery: Delivery, deps: Deps) -> RolloutView:
    """One rollout's state and per-stage counts; with no version, the newest release's."""
    if req.version:
        r = await _rollout(deps, req.version)
    else:
        rollouts = await deps.store.rollouts()
        if not rollouts:
            raise RpcFailure("not_found", "no release has been published yet")
        r = max(rollouts, key=lambda r: r.semver)
    return (await _views(deps, [r]))[0]


async def rollout_list(req: RolloutList, delivery: Delivery, deps: Deps) -> list[RolloutView]:
    rollouts = sorted(await deps.store.rollouts(), key=lambda r: r.semver, reverse=True)
    return await _views(deps, rollouts)


async def rollout_explain(req: RolloutExplain, delivery: Delivery, deps: Deps) -> Explanation:
    cell = await known_cell(deps, req.id)
    policy, rollouts = await deps.store.policy(), await deps.store.rollouts()
    windows = await deps.store.windows(policy, rollouts)
    reason, sentence, version = explain(cell, rollouts, policy, deps.clock.now(), windows)
    return Explanation(
        cell=cell.id,
        stage=cell.stage,
        status=cell.status,
        reason=reason,
        explanation=sentence,
        release=version,
        installed_release=cell.installed_release,
        desired_release=cell.desired_version,
        desired_generation=cell.desired_generation,
        pinned=cell.pinned,
        held=cell.held,
        hold_deadline=cell.hold_deadline,
    )


async def policy_show(req: PolicyShow, delivery: Delivery, deps: Deps) -> RolloutPolicy:
    return await deps.store.policy()


# -- operators' actions ---------------------------------------------------------------------------

# An operator's action is read, decided and written with the revision it read; the controller
# may write in between (once a second at most), so a few tries are plenty.
ACTION_TRIES = 5


async def _act(
    version: str, deps: Deps, action: Callable[[Rollout, datetime], Rollout]
) -> RolloutView:
    for _ in range(ACTION_TRIES):
        r = await _rollout(deps, version)
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


async def rollout_pause(req: RolloutPause, delivery: Delivery, deps: Deps) -> RolloutView:
    return await _act(req.version, deps, pause)


async def rollout_resume(req: RolloutResume, delivery: Delivery, deps: Deps) -> RolloutView:
    return await _act(req.version, deps, resume)


async def rollout_abort(req: RolloutAbort, delivery: Delivery, deps: Deps) -> RolloutView:
    return await _act(req.version, deps, abort)


async def rollout_approve(req: RolloutApprove, delivery: Delivery, deps: Deps) -> RolloutView:
    by = delivery.user_id or ""
    return await _act(req.version, deps, lambda r, now: approve(r, now, by, req.stage))


async def rollout_promote(req: RolloutPromote, delivery: Delivery, deps: Deps) -> RolloutView:
    return await _act(req.version, deps, promote)


async def rollout_retry(req: RolloutRetry, delivery: Delivery, deps: Deps) -> RolloutView:
    return await _act(req.version, deps, retry)


async def rollout_schedule(req: RolloutSchedule, delivery: Delivery, deps: Deps) -> RolloutView:
    return await _act(req.version, deps, lambda r, now: schedule(r, now, req.stage, req.at))


async def cell_pin(req: CellsPin, delivery: Delivery, deps: Deps) -> Pin:
    """Keep a cell on one release: it is sent that release if it is not on it, and no rollout
    moves it until it is unpinned. A pin never takes a cell backwards."""
    cell = await known_cell(deps, req.id)
    if await deps.store.get(req.version) is None:
        raise RpcFailure("not_found", f"release {req.version!r} is not published")
    if newer(cell.installed_release, req.version):
        raise RpcFailure(
            "conflict",
            f"{req.id} runs {cell.installed_release}, newer than {req.version}; a cell never "
            "goes backwards (pin it to its current release or a newer one)",
        )
    await deps.store.set_pin(req.id, req.version)
    deps.wake()
    return Pin(cell=req.id, pinned=req.version, installed_release=cell.installed_release)


async def cell_unpin(req: CellsUnpin, delivery: Delivery, deps: Deps) -> Pin:
    cell = await known_cell(deps, req.id)
    await deps.store.set_pin(req.id, None)
    deps.wake()
    return Pin(cell=req.id, pinned=None, installed_release=cell.installed_release)


async def policy_set(req: PolicySet, delivery: Delivery, deps: Deps) -> RolloutPolicy:
    """Replace the policy (keys left out take their defaults); running rollouts follow it from
    their next step."""
    await deps.store.set_policy(req.policy)
    deps.wake()
    return req.policy


# -- routing --------------------------------------------------------------------------------------


def cell_routes(deps: Deps) -> list[Route]:
    return [route(CellUpgrade, on_cell_upgrade, deps), route(CellSync, on_cell_sync, deps)]


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(ReleasePublish, release_publish, deps),
        route(ReleaseList, release_list, deps),
        route(ReleaseShow, release_show, deps),
        route(RolloutPlan, rollout_plan, deps),
        route(RolloutShow, rollout_status, deps),
        route(RolloutList, rollout_list, deps),
        route(RolloutPause, rollout_pause, deps),
        route(RolloutResume, rollout_resume, deps),
        route(RolloutAbort, rollout_abort, deps),
        route(RolloutApprove, rollout_approve, deps),
        route(RolloutPromote, rollout_promote, deps),
        route(RolloutRetry, rollout_retry, deps),
        route(RolloutSchedule, rollout_schedule, deps),
        route(RolloutExplain, rollout_explain, deps),
        route(PolicyShow, policy_show, deps),
        route(PolicySet, policy_set, deps),
        route(CellsPin, cell_pin, deps),
        route(CellsUnpin, cell_unpin, deps),
        route(Status, status, deps),
    ]
