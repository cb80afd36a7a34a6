"""Which cells a release reaches in which stage and wave (``rollout plan`` and each stage's
start), and which it leaves out and why."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from common.requests.rollout import Plan, WavePolicy
from common.versions import SemVer
from common.vocabulary import STAGES, SkipReason
from services.rollout.model.cells import CellFacts
from services.rollout.model.path import path


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
