"""Which cells a release reaches in which stage and wave (``rollout plan`` and each stage's
start), and which it leaves out and why."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from common.requests.rollout import Plan, RolloutPolicy, WavePolicy
from common.versions import SemVer
from common.vocabulary import STAGES, SkipReason, Stage
from services.rollout.model.cells import CellFacts
from services.rollout.model.path import path
from services.rollout.model.windows import Windows


def _order_key(version: str, cell_id: str) -> str:
    """A stable order that differs per release, so the canary is not always the same cell."""
    return hashlib.sha256(f"{version}:{cell_id}".encode()).hexdigest()


def split_waves(cell_ids: list[str], version: str, policy: WavePolicy) -> list[list[str]]:
    ordered = sorted(cell_ids, key=lambda c: _order_key(version, c))
    waves: list[list[str]] = []
    canary = ordered[: policy.canary]
    if canary:
        waves.append(canary)
    rest = ordered[len(canary) :]
    taken = 0
    for fraction in policy.fractions:
        upto = max(taken, math.ceil(fraction * len(rest)))
        if upto > taken:
            waves.append(rest[taken:upto])
            taken = upto
    return waves


def skip_reason(cell: CellFacts, version: str) -> SkipReason | None:
    if cell.status == "decommissioned":
        return "decommissioned"
    if cell.status == "created":
        return "not_registered"
    if cell.pinned is not None:
        return "pinned"
    if cell.held:
        return "held"
    target, installed = SemVer.parse(version), SemVer.parse(cell.installed_release)
    if installed is not None and target is not None and installed >= target:
        return "up_to_date"  # a cell never goes backwards
    if cell.status == "offline":
        return "offline"
    return None


def plan(
    version: str,
    cells: list[CellFacts],
    policy: WavePolicy,
    required: Sequence[str] = (),
) -> Plan:
    """Which cells a release reaches in which stage and wave, and which are skipped and why;
    for a cell behind a required release, the path it walks. staging and saas go as one wave
    each; dedicated goes in the policy's waves."""
    skipped: dict[str, SkipReason] = {}
    paths: dict[str, list[str]] = {}
    by_stage: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for cell in sorted(cells, key=lambda c: c.id):
        reason = skip_reason(cell, version)
        if reason is None:
            by_stage[cell.stage].append(cell.id)
        else:
            skipped[cell.id] = reason
        if reason in (None, "offline", "held"):  # it gets the release, now or when it can
            walk = path(cell.installed_release, version, required)
            if len(walk) > 1:
                paths[cell.id] = walk
    stages = {
        stage: (
            split_waves(ids, version, policy) if stage == "dedicated" else ([ids] if ids else [])
        )
        for stage, ids in by_stage.items()
    }
    return Plan(version=version, stages=stages, skipped=skipped, paths=paths)


def predict(
    plan_: Plan,
    cells: list[CellFacts],
    policy: RolloutPolicy,
    windows: Windows,
    now: datetime,
    *,
    bakes: Mapping[Stage, float],
    starts_at: Mapping[Stage, datetime] | None = None,
    approved: Sequence[str] = (),
) -> tuple[dict[str, datetime], str | None]:
    """When each planned cell would be sent the release if its rollout started ``now`` and
    every cell applied it at once: the stages and waves in order, each wave waiting for its
    cells' maintenance windows (a deferred cell when its deferral ends, without holding its
    wave), then its bake, then the soak before the next; and a stage's scheduled start. A
    stage that waits for an approval ends the prediction there (the second value says which)."""
    by_id = {c.id: c for c in cells}
    when: dict[str, datetime] = {}
    t = now
    waves = [(stage, wave) for stage in STAGES for wave in plan_.stages.get(stage, [])]
    for i, (stage, wave) in enumerate(waves):
        first = i == 0 or waves[i - 1][0] != stage
        if first:
            t = max(t, (starts_at or {}).get(stage, t))
            if stage in policy.approval_stages and stage not in approved:
                return when, stage
        end = t
        for cell_id in wave:
            cell = by_id[cell_id]
            at = windows.opens(cell, plan_.version, t) or t
            if windows.deferred(cell, plan_.version, at) and cell.deferred_until is not None:
                when[cell_id] = max(at, cell.deferred_until)
                continue  # a deferred cell does not hold its wave
            when[cell_id] = at
            end = max(end, at)
        t = end + timedelta(seconds=bakes.get(stage, 0.0))
        if i + 1 < len(waves):
            t += timedelta(seconds=policy.soak_seconds.of(stage))
    return when, None
