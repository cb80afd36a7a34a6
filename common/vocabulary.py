"""The words the parts share, each defined once: stages, cell statuses, upgrade phases, rollout
states, compliance states and the reasons the control plane gives. Everything else imports them
from here; a tuple of the values sits beside each type, in its meaningful order, for loops and
argument choices."""

from __future__ import annotations

from typing import Literal, get_args

# What an operator may do: a viewer reads; an operator also publishes releases, pauses and
# resumes, sets flags and approves; an admin also creates and decommissions cells and manages
# operators and policy (common/operators.py).
Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)

# A release reaches the stages in this order.
Stage = Literal["staging", "saas", "dedicated"]
STAGES: tuple[Stage, ...] = get_args(Stage)

# created: the record and broker user exist, the agent has not registered yet.
CellStatus = Literal["created", "online", "offline", "decommissioned"]
CELL_STATUSES: tuple[CellStatus, ...] = get_args(CellStatus)
# Cells that have registered and are not decommissioned: the fleet a release can reach.
REGISTERED: tuple[CellStatus, ...] = ("online", "offline")

# The steps an agent reports while applying a desired state; the last three are outcomes.
UpgradePhase = Literal["accepted", "verifying", "applying", "succeeded", "failed", "rolled_back"]
UPGRADE_PHASES: tuple[UpgradePhase, ...] = get_args(UpgradePhase)
TERMINAL_PHASES: frozenset[UpgradePhase] = frozenset({"succeeded", "failed", "rolled_back"})
FAILED_PHASES: frozenset[UpgradePhase] = frozenset({"failed", "rolled_back"})

RolloutState = Literal[
    "in_progress", "soaking", "halted", "paused", "completed", "aborted", "superseded"
]
ROLLOUT_STATES: tuple[RolloutState, ...] = get_args(RolloutState)
# A rollout in one of these still has work to do (or waits for an operator).
ACTIVE_STATES: tuple[RolloutState, ...] = ("in_progress", "soaking", "halted", "paused")
# A rollout in one of these is moving: it can be paused, and it reaches cells.
RUNNING_STATES: tuple[RolloutState, ...] = ("in_progress", "soaking")
FINISHED_STATES: tuple[RolloutState, ...] = ("completed", "aborted", "superseded")

# Infrastructure compliance of a cell: on the required template, within its deadline, or past it.
ComplianceState = Literal["compliant", "pending", "out_of_sla"]
COMPLIANCE_STATES: tuple[ComplianceState, ...] = get_args(ComplianceState)

# Why a release's plan leaves a cell out.
SkipReason = Literal["decommissioned", "offline", "pinned", "held", "not_registered", "up_to_date"]

# Why a cell is (or is not) on the newest release: `rollout explain`.
ExplainReason = Literal[
    "up_to_date",
    "in_progress",
    "failed",
    "inconclusive",
    "waiting_for_stage",
    "deferred",
    "waiting_for_approval",
    "scheduled",
    "waiting_for_wave",
    "waiting_for_window",
    "offline",
    "pinned",
    "held",
    "halted",
    "paused",
    "not_registered",
    "decommissioned",
    "no_release",
]

# Why an agent asks for its desired state again.
# "defer": the customer asks to defer updates (the sync carries the deferral).
SyncReason = Literal["start", "reconnect", "periodic", "flags", "defer"]

DebugAccessAction = Literal["granted", "revoked", "expired"]
