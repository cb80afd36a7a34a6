"""The rollout service's decisions, pure: which cells a release reaches in which stage and
wave, each step of the controller, catching cells up, operators' actions, and explaining a
cell. Nothing here does I/O or reads a clock; the controller (``controller.py``) loads state,
calls these and writes what they return.

    cells.py      what rollout knows of a cell; where a cell stands with one release
    rollout.py    a release's rollout, as kept between steps
    path.py       upgrade paths: required releases a cell installs on the way
    plan.py       the stages and waves of a release (``rollout plan``)
    step.py       one controller step of one rollout; which rollouts a newer one supersedes
    catch_up.py   desired states no wave takes care of (first install, back online, pins)
    actions.py    pause, resume, abort
    health.py     what a desired state asks a cell to check
    explain.py    why a cell is (not) on the newest release, as a table of cases

The release file and the policy are request schemas: ``common.requests.rollout``; the order
of a cell's upgrade reports is ``common.report_order``, which the fleet view follows too.
"""

from common.requests.rollout import (
    Halt,
    ReleaseFile,
    RolloutPolicy,
    SoakTimes,
    StagePolicies,
    StagePolicy,
    WavePolicy,
)
from common.vocabulary import STAGES as STAGE_ORDER
from services.rollout.model.actions import (
    ActionRefused,
    abort,
    approve,
    pause,
    promote,
    resume,
    retry,
    schedule,
)
from services.rollout.model.catch_up import catch_up, failed_with_nothing_changed
from services.rollout.model.cells import (
    CellFacts,
    CellProgress,
    at_least,
    cell_progress,
    failure_of,
    newer,
    newest_first,
)
from services.rollout.model.explain import explain
from services.rollout.model.health import health_for
from services.rollout.model.path import next_step, path, required_versions
from services.rollout.model.plan import plan, predict, skip_reason, split_waves
from services.rollout.model.rollout import Rollout, new_rollout
from services.rollout.model.step import Assign, Decision, stage_counts, step, superseded

__all__ = [
    "STAGE_ORDER",
    "ActionRefused",
    "Assign",
    "CellFacts",
    "CellProgress",
    "Decision",
    "Halt",
    "ReleaseFile",
    "Rollout",
    "RolloutPolicy",
    "SoakTimes",
    "StagePolicies",
    "StagePolicy",
    "WavePolicy",
    "abort",
    "approve",
    "at_least",
    "catch_up",
    "cell_progress",
    "explain",
    "failed_with_nothing_changed",
    "failure_of",
    "health_for",
    "new_rollout",
    "newer",
    "newest_first",
    "next_step",
    "path",
    "pause",
    "plan",
    "predict",
    "promote",
    "required_versions",
    "resume",
    "retry",
    "schedule",
    "skip_reason",
    "split_waves",
    "stage_counts",
    "step",
    "superseded",
]
