"""A cell's record, defined once: every field of its hash (``registry:cell:<id>``) and its type.

The three shapes of one cell come from here:

- the hash: ``CellFields``, what a transition may write (a misspelt field, or a value of the
  wrong type, fails mypy where the transition is written; None clears a field);
- the record transitions decide on: ``CellRecord``, the fields they read, parsed from the
  hash's strings by the types declared here;
- the operator's view: ``CellView`` (common/requests/registry.py), the hash's fields as the
  contract shows them, and what follows from them (``credentials_pending``, the refused
  registrations).

``tests/unit/test_registry_record.py`` holds the three together: every field of the record and
of the view is a field of the hash, with the same type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypedDict, TypeVar

from common.vocabulary import CELL_STATUSES, STAGES, CellStatus, ComplianceState, Stage


class CellFields(TypedDict, total=False):
    """Every field of a cell's record hash. Stored as strings (``common.scripts.encode``): ''
    or missing is absent."""

    id: str
    stage: Stage
    region: str
    org: str
    status: CellStatus
    created_at: datetime
    decommissioned_at: datetime
    # The broker credential in force, and one a rotation waits for the cell to confirm.
    credential_id: str | None
    pending_credential_id: str | None
    rotation_started_at: datetime | None
    # Bound at the first registration (or at creation).
    aws_account_id: str | None
    # The agent's public key a rotated secret is sealed to (common/sealing.py): bound at the
    # first registration that presents one; only an operator's rotation with --rebind clears it.
    rotation_key: str | None
    registered_at: datetime
    # The agent's run (a new state directory is a new incarnation) and its report sequence.
    incarnation: str | None
    last_seq: int
    last_heartbeat_at: datetime
    agent_version: str
    stack_name: str | None
    infra_template_version: str | None
    installed_release: str | None
    applied_generation: int | None
    flags_snapshot_version: int | None
    maintenance: bool
    maintenance_since: datetime | None
    maintenance_until: datetime | None
    maintenance_seconds_total: float
    last_maintenance_seq: int
    # The compliance service's word on the cell's template, ordered by its event time.
    compliance: ComplianceState
    compliance_deadline: datetime | None
    compliance_at: float


# The names of CellFields' keys, for the places that name a field rather than write one (what a
# decision read, which field orders a write).
CellField = Literal[
    "id",
    "stage",
    "region",
    "org",
    "status",
    "created_at",
    "decommissioned_at",
    "credential_id",
    "pending_credential_id",
    "rotation_started_at",
    "aws_account_id",
    "rotation_key",
    "registered_at",
    "incarnation",
    "last_seq",
    "last_heartbeat_at",
    "agent_version",
    "stack_name",
    "infra_template_version",
    "installed_release",
    "applied_generation",
    "flags_snapshot_version",
    "maintenance",
    "maintenance_since",
    "maintenance_until",
    "maintenance_seconds_total",
    "last_maintenance_seq",
    "compliance",
    "compliance_deadline",
    "compliance_at",
]

L = TypeVar("L", Stage, CellStatus, ComplianceState)


@dataclass(frozen=True, slots=True)
class CellRecord:
    """The fields of a cell's record that transitions decide on (None: absent). ``status`` None
    means there is no record at all."""

    status: CellStatus | None = None
    stage: Stage | None = None
    region: str | None = None
    org: str | None = None
    aws_account_id: str | None = None
    rotation_key: str | None = None
    last_seq: int | None = None
    incarnation: str | None = None
    registered_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    pending_credential_id: str | None = None
    maintenance_since: datetime | None = None
    last_maintenance_seq: int | None = None
    infra_template_version: str | None = None
    compliance_at: float | None = None

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> CellRecord:
        """From the record's fields as stored (strings; '' or missing: absent)."""

        def text(name: CellField) -> str | None:
            return raw.get(name) or None

        def number(name: CellField) -> int | None:
            value = raw.get(name)
            return int(value) if value else None

        def time(name: CellField) -> datetime | None:
            value = raw.get(name)
            return datetime.fromisoformat(value) if value else None

        def one_of(name: CellField, allowed: tuple[L, ...]) -> L | None:
            value = raw.get(name)
            if not value:
                return None
            if value not in allowed:
                raise ValueError(f"a cell's {name} holds {value!r}, none of {allowed}")
            return value

        compliance_at = raw.get("compliance_at")
        return cls(
            status=one_of("status", CELL_STATUSES),
            stage=one_of("stage", STAGES),
            region=text("region"),
            org=text("org"),
            aws_account_id=text("aws_account_id"),
            rotation_key=text("rotation_key"),
            last_seq=number("last_seq"),
            incarnation=text("incarnation"),
            registered_at=time("registered_at"),
            last_heartbeat_at=time("last_heartbeat_at"),
            pending_credential_id=text("pending_credential_id"),
            maintenance_since=time("maintenance_since"),
            last_maintenance_seq=number("last_maintenance_seq"),
            infra_template_version=text("infra_template_version"),
            compliance_at=float(compliance_at) if compliance_at else None,
        )
