"""How a cell's record changes, pure: each transition is a function from the record (as read),
the message and the time to a :class:`Transition`: the outcome, the fields to write, the event
to announce, and which fields of the record the decision read.

The store writes a transition atomically and only if the fields it read still hold what they
held (and, for ordered reports, only if its sequence number is newer); otherwise it reads the
record again and asks the same function. Nothing here touches Redis or the bus.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from common.messages import (
    CellCreated,
    CellDebugAccess,
    CellDecommissioned,
    CellHeartbeat,
    CellMaintenance,
    CellOffline,
    CellOnline,
    CellRegister,
    CellRegistered,
    CellRegistrationRefused,
    CellTemplateChanged,
    CredentialsConfirmed,
    Event,
    InfraComplianceChanged,
)
from common.requests.registry import AuditEntry, CellsCreate
from common.vocabulary import REGISTERED
from services.registry.record import CellField, CellFields, CellRecord


class Outcome(StrEnum):
    CREATED = "created"
    EXISTS = "exists"
    REGISTERED = "registered"
    REFUSED_UNKNOWN_CELL = "refused_unknown_cell"
    REFUSED_DECOMMISSIONED = "refused_decommissioned"
    REFUSED_ACCOUNT = "refused_account"
    APPLIED = "applied"
    BACK_ONLINE = "back_online"
    STALE = "stale"
    UNKNOWN_CELL = "unknown_cell"
    NOT_REGISTERED = "not_registered"
    ENTERED_MAINTENANCE = "entered"
    LEFT_MAINTENANCE = "left"
    IGNORED = "ignored"
    OFFLINE = "offline"
    NOT_ONLINE = "not_online"
    ROTATION_STARTED = "rotation_started"
    ROTATION_ENDED = "rotation_ended"
    DECOMMISSIONED = "decommissioned"
    ALREADY_DECOMMISSIONED = "already"
    COMPLIANCE_RECORDED = "compliance_recorded"
    AUDITED = "audited"


# What a heartbeat's record almost always is: an online cell with no rotation waiting and out
# of maintenance, on the template version the heartbeat reports.
_USUAL_HEARTBEAT: tuple[CellField, ...] = (
    "status",
    "pending_credential_id",
    "maintenance_since",
    "infra_template_version",
)


def assumed_online(template_version: str | None) -> dict[str, str]:
    """The fields of a heartbeat's usual record. The store decides a heartbeat on this first,
    guarded on exactly these fields, so the hot path is one round trip; a record that differs
    is read back and decided again."""
    usual = ("online", "", "", template_version or "")
    return dict(zip(_USUAL_HEARTBEAT, usual, strict=True))


class Refusal(BaseModel):
    """A refused registration, kept on the cell's record for the operator."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    reason: str
    aws_account_id: str
    region: str


# Shared by every transition that writes nothing: never changed after a transition is made.
_NOTHING: CellFields = {}
_NO_SECONDS: Mapping[CellField, float] = MappingProxyType({})


class Transition(NamedTuple):
    """A decision about one cell's record. A named tuple: one is made per heartbeat, and a
    tuple is several times cheaper to make than a frozen dataclass."""

    outcome: Outcome
    # Record fields to write (None clears one).
    changes: CellFields = _NOTHING
    # Record fields the decision read: written only if they still hold what was read.
    read: frozenset[CellField] = frozenset()
    # Written only if this sequence number is above the one in the named field.
    newer: tuple[CellField, float] | None = None
    # Seconds added to numeric fields.
    add: Mapping[CellField, float] = _NO_SECONDS
    events: tuple[Event, ...] = ()
    refusal: Refusal | None = None
    # A line of the cell's audit trail (debug access), kept in the order of the cell's reports.
    audit: AuditEntry | None = None
    # A heartbeat that carried the credential a rotation is waiting for.
    confirmed_rotation: bool = False
    # A registration that presented another key than the one bound (kept: a holder of the
    # cell's URL must not be able to have the next rotated secret sealed to its own key).
    foreign_rotation_key: bool = False
    # How long the stay in maintenance that just ended lasted.
    maintenance_seconds: float | None = None

    @property
    def writes(self) -> bool:
        return bool(self.changes or self.add or self.events or self.refusal or self.audit)


# -- creating -----------------------------------------------------------------------------------


def create(record: CellRecord, cell: CellsCreate, credential_id: str, now: datetime) -> Transition:
    if record.status is not None:
        return Transition(Outcome.EXISTS)
    return Transition(
        Outcome.CREATED,
        changes={
            "id": cell.id,
            "stage": cell.stage,
            "region": cell.region,
            "org": cell.org,
            "status": "created",
            "created_at": now,
            "aws_account_id": cell.aws_account,
            "credential_id": credential_id,
        },
        read=frozenset({"status"}),
        events=(
            CellCreated(
                at=now, cell_id=cell.id, stage=cell.stage, region=cell.region, org=cell.org
            ),
        ),
    )


# -- registration -------------------------------------------------------------------------------

_REGISTRATION_READS: frozenset[CellField] = frozenset(
    {"status", "aws_account_id", "last_seq", "incarnation", "registered_at", "rotation_key"}
)


def register(record: CellRecord, msg: CellRegister, now: datetime) -> Transition:
    """A registration binds the cell to the AWS account it first registers from; another
    account is refused (and recorded), and so is a cell that is unknown or decommissioned. A
    repeated registration (same incarnation, no newer sequence number) changes nothing; a new
    incarnation (a re-bootstrapped agent) starts a new sequence."""
    if record.status is None or record.status == "decommissioned":
        why = "unknown_cell" if record.status is None else "decommissioned"
        outcome = (
            Outcome.REFUSED_UNKNOWN_CELL
            if record.status is None
            else Outcome.REFUSED_DECOMMISSIONED
        )
        return _refused(
            outcome, f"cell is {why.replace('_', ' ')}", msg, now, frozenset({"status"})
        )
    if record.aws_account_id and record.aws_account_id != msg.aws_account_id:
        return _refused(
            Outcome.REFUSED_ACCOUNT,
            f"cell is bound to AWS account {record.aws_account_id}",
            msg,
            now,
            frozenset({"status", "aws_account_id"}),
        )
    same_run = record.incarnation == (msg.incarnation or None)
    if same_run and record.last_seq is not None and msg.seq <= record.last_seq:
        return Transition(Outcome.STALE)
    assert record.stage is not None and record.region is not None and record.org is not None
    changes: CellFields = {
        "status": "online",
        "aws_account_id": msg.aws_account_id,
        "last_seq": msg.seq,
        "incarnation": msg.incarnation,
        "last_heartbeat_at": now,
        "agent_version": msg.agent_version,
        "stack_name": msg.stack_name,
        "infra_template_version": msg.template_version,
        "installed_release": msg.installed_release,
    }
    if record.registered_at is None:
        changes["registered_at"] = now
    if record.rotation_key is None and msg.rotation_key is not None:
        changes["rotation_key"] = msg.rotation_key
    return Transition(
        Outcome.REGISTERED,
        changes=changes,
        read=_REGISTRATION_READS,
        foreign_rotation_key=(
            record.rotation_key is not None
            and msg.rotation_key is not None
            and msg.rotation_key != record.rotation_key
        ),
        events=(
            CellRegistered(
                at=now,
                cell_id=msg.cell_id,
                stage=record.stage,
                region=record.region,
                org=record.org,
                aws_account_id=msg.aws_account_id,
                agent_version=msg.agent_version,
                installed_release=msg.installed_release,
                template_version=msg.template_version,
                incarnation=msg.incarnation,
            ),
        ),
    )


def _refused(
    outcome: Outcome, reason: str, msg: CellRegister, now: datetime, read: frozenset[CellField]
) -> Transition:
    return Transition(
        outcome,
        read=read,
        events=(
            CellRegistrationRefused(
                at=now, cell_id=msg.cell_id, reason=reason, aws_account_id=msg.aws_account_id
            ),
        ),
        refusal=Refusal(
            at=now, reason=reason, aws_account_id=msg.aws_account_id, region=msg.region
        ),
    )


# -- heartbeats ---------------------------------------------------------------------------------


_HEARTBEAT_READS = frozenset(_USUAL_HEARTBEAT)


def heartbeat(record: CellRecord, msg: CellHeartbeat, now: datetime) -> Transition:
    """A registered cell's heartbeat records what it runs and keeps it online, on the
    registry's clock (never the cell's ``sent_at``). Heartbeats are ordered by the cell's
    sequence number: an older one changes nothing. One from an offline cell brings it back
    (``cell.online``); one that carries the credential a rotation waits for confirms it."""
    if record.status is None:
        return Transition(Outcome.UNKNOWN_CELL)
    if record.status not in REGISTERED:
        return Transition(Outcome.NOT_REGISTERED)
    if record.last_seq is not None and msg.seq <= record.last_seq:
        return Transition(Outcome.STALE)
    changes: CellFields = {
        "last_seq": msg.seq,
        "last_heartbeat_at": now,
        "agent_version": msg.agent_version,
        "installed_release": msg.installed_release,
        "applied_generation": msg.applied_generation,
        "maintenance": msg.maintenance,
        "infra_template_version": msg.template_version,
        "flags_snapshot_version": msg.flags_snapshot_version,
    }
    confirmed = bool(
        msg.credential_id
        and record.pending_credential_id
        and msg.credential_id == record.pending_credential_id
    )
    events: list[Event] = []
    if confirmed:
        # The old secret's connections are closed once this is written (the event's handler).
        assert msg.credential_id is not None
        events.append(
            CredentialsConfirmed(at=now, cell_id=msg.cell_id, credential_id=msg.credential_id)
        )
        changes.update(
            {
                "credential_id": msg.credential_id,
                "pending_credential_id": None,
                "rotation_started_at": None,
            }
        )
    read: frozenset[CellField] = _HEARTBEAT_READS
    add: Mapping[CellField, float] = _NO_SECONDS
    took: float | None = None
    if msg.maintenance != (record.maintenance_since is not None):
        # The heartbeat shows the cell in (or out of) maintenance and the record does not: the
        # maintenance report was lost or is late. The heartbeat is the cell's newer word, unless
        # a maintenance report already said something newer.
        read = _HEARTBEAT_READS | {"last_maintenance_seq"}
        if record.last_maintenance_seq is None or msg.seq > record.last_maintenance_seq:
            changes["last_maintenance_seq"] = msg.seq
            if msg.maintenance:
                changes["maintenance_since"] = now
            else:
                took = _stay(record, now)
                changes.update({"maintenance_since": None, "maintenance_until": None})
                add = {"maintenance_seconds_total": took}
    outcome = Outcome.APPLIED
    if record.status == "offline":
        changes["status"] = "online"
        events.append(CellOnline(at=now, cell_id=msg.cell_id))
        outcome = Outcome.BACK_ONLINE
    if msg.template_version != record.infra_template_version:
        # The customer applied an infrastructure update (or this is the first word of it).
        events.append(
            CellTemplateChanged(
                at=now,
                cell_id=msg.cell_id,
                template_version=msg.template_version,
                previous_version=record.infra_template_version,
            )
        )
    return Transition(
        outcome,
        changes=changes,
        read=read,
        newer=("last_seq", msg.seq),
        events=tuple(events),
        confirmed_rotation=confirmed,
        add=add,
        maintenance_seconds=took,
    )


# -- maintenance --------------------------------------------------------------------------------


def maintenance(record: CellRecord, msg: CellMaintenance, now: datetime) -> Transition:
    """Track when a cell entered maintenance and how long each stay lasted (on the registry's
    clock). Ordered by the report's own sequence number."""
    if record.status is None or record.status == "decommissioned":
        return Transition(Outcome.IGNORED)
    if record.last_maintenance_seq is not None and msg.seq <= record.last_maintenance_seq:
        return Transition(Outcome.STALE)
    read: frozenset[CellField] = frozenset({"status", "maintenance_since", "last_maintenance_seq"})
    if msg.enabled:
        changes: CellFields = {
            "last_maintenance_seq": msg.seq,
            "maintenance": True,
            "maintenance_until": msg.enabled_until,
        }
        if record.maintenance_since is None:
            changes["maintenance_since"] = now
        return Transition(Outcome.ENTERED_MAINTENANCE, changes=changes, read=read)
    took = _stay(record, now)
    return Transition(
        Outcome.LEFT_MAINTENANCE,
        changes={
            "last_maintenance_seq": msg.seq,
            "maintenance": False,
            "maintenance_since": None,
            "maintenance_until": None,
        },
        read=read,
        add={"maintenance_seconds_total": took},
        maintenance_seconds=took,
    )


def _stay(record: CellRecord, now: datetime) -> float:
    """How long the stay in maintenance that ends now lasted (on the registry's clock)."""
    if record.maintenance_since is None:
        return 0.0
    return max(0.0, (now - record.maintenance_since).total_seconds())


# -- liveness -----------------------------------------------------------------------------------


def go_offline(record: CellRecord, cell_id: str, cutoff: datetime, now: datetime) -> Transition:
    """An online cell whose last heartbeat (by the registry's clock) is at or before ``cutoff``
    is offline; it is kept, never deleted. A cell that is no longer online only leaves the
    liveness index (its status written again as it is)."""
    if record.status != "online":
        return Transition(
            Outcome.NOT_ONLINE,
            changes={"status": record.status} if record.status else {},
            read=frozenset({"status"}),
        )
    if record.last_heartbeat_at is not None and record.last_heartbeat_at > cutoff:
        return Transition(Outcome.APPLIED)  # a heartbeat came in since the index was read
    return Transition(
        Outcome.OFFLINE,
        changes={"status": "offline"},
        read=frozenset({"status", "last_heartbeat_at"}),
        events=(CellOffline(at=now, cell_id=cell_id, last_heartbeat_at=record.last_heartbeat_at),),
    )


# -- credentials and decommissioning ------------------------------------------------------------


def _gone(record: CellRecord) -> Transition | None:
    """What an operator's change to a cell that does not exist or is decommissioned comes to."""
    if record.status is None:
        return Transition(Outcome.UNKNOWN_CELL)
    if record.status == "decommissioned":
        return Transition(Outcome.ALREADY_DECOMMISSIONED)
    return None


def start_rotation(record: CellRecord, credential_id: str, now: datetime) -> Transition:
    """A new password is in force at the broker; the cell confirms it in a heartbeat."""
    if (gone := _gone(record)) is not None:
        return gone
    return Transition(
        Outcome.ROTATION_STARTED,
        changes={"pending_credential_id": credential_id, "rotation_started_at": now},
        read=frozenset({"status"}),
    )


def replace_credential(record: CellRecord, credential_id: str) -> Transition:
    """A new password delivered by hand: in force at once, nothing to confirm, and the bound
    key forgotten (the next registration binds one again)."""
    if (gone := _gone(record)) is not None:
        return gone
    return Transition(
        Outcome.ROTATION_ENDED,
        changes={
            "credential_id": credential_id,
            "pending_credential_id": None,
            "rotation_started_at": None,
            "rotation_key": None,
        },
        read=frozenset({"status"}),
    )


def end_rotation(record: CellRecord) -> Transition:
    """Give up waiting for a confirmation: the credential in force is the new one."""
    changes: CellFields = {"rotation_started_at": None}
    if record.pending_credential_id:
        changes.update(
            {"credential_id": record.pending_credential_id, "pending_credential_id": None}
        )
    return Transition(
        Outcome.ROTATION_ENDED, changes=changes, read=frozenset({"pending_credential_id"})
    )


def decommission(record: CellRecord, cell_id: str, now: datetime) -> Transition:
    """The record is kept as history; the cell is refused from now on."""
    if (gone := _gone(record)) is not None:
        return gone
    return Transition(
        Outcome.DECOMMISSIONED,
        changes={
            "status": "decommissioned",
            "decommissioned_at": now,
            "pending_credential_id": None,
            "rotation_started_at": None,
        },
        read=frozenset({"status"}),
        events=(CellDecommissioned(at=now, cell_id=cell_id),),
    )


# -- what others tell the registry ---------------------------------------------------------------


def compliance(record: CellRecord, msg: InfraComplianceChanged) -> Transition:
    """The cell's infrastructure compliance as the compliance service decided it, shown with
    the record; ordered by the service's event time."""
    if record.status is None:
        return Transition(Outcome.IGNORED)
    at = msg.at.timestamp()
    if record.compliance_at is not None and at <= record.compliance_at:
        return Transition(Outcome.STALE)
    return Transition(
        Outcome.COMPLIANCE_RECORDED,
        changes={
            "compliance": msg.status,
            "compliance_deadline": msg.deadline,
            "compliance_at": at,
        },
        newer=("compliance_at", at),
    )


def debug_access(record: CellRecord, msg: CellDebugAccess) -> Transition:
    """Debug access the customer opened or closed, kept as the cell's audit trail (the control
    plane only records it: nothing here can open access)."""
    if record.status is None:
        return Transition(Outcome.UNKNOWN_CELL)
    return Transition(
        Outcome.AUDITED,
        audit=AuditEntry(
            seq=msg.seq,
            at=msg.occurred_at or msg.sent_at,
            action=msg.action,
            role_arn=msg.role_arn,
            expires_at=msg.expires_at,
            reason=msg.reason,
            granted_by=msg.granted_by,
        ),
    )
