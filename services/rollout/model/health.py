"""What a desired state asks a cell to check: the release's health checks (or the policy's
when it declares none), with the release's bake and watch (or its stage's)."""

from __future__ import annotations

from common.health import HealthSpec, resolve
from common.releases import Release
from common.requests.rollout import RolloutPolicy
from common.vocabulary import Stage


def health_for(release: Release | None, policy: RolloutPolicy, stage: Stage) -> HealthSpec | None:
    """None: nothing to check (no release, or no checks anywhere): the outcome decides."""
    if release is None:
        return None
    stage_policy = policy.stages.of(stage)
    return resolve(
        release.health,
        policy.default_checks(),
        bake_seconds=stage_policy.bake_seconds,
        watch_seconds=stage_policy.watch_seconds,
    )
