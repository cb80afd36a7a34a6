"""The registry's transitions, pure: each decision from a record, a message and the time, with
its refusals and stale cases, and which fields each decision depends on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

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
    InfraComplianceChanged,
)
from common.requests.registry import CellsCreate
from services.registry import transitions as t
from services.registry.record import CellRecord
from services.registry.transitions import Outcome, assumed_online

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ACCOUNT, OTHER = "123456789012", "210987654321"


def record(**fields: object) -> CellRecord:
    base: dict[str, object] = {"status": "online", "stage": "dedicated", "region": "eu-west-1",
                               "org": "acme"}  # fmt: skip
    return CellRecord(**{**base, **fields})  # type: ignore[arg-type]


def register(
    seq: int = 1, account: str = ACCOUNT, incarnation: str | None = "i1", key: str | None = None
) -> CellRegister:
    return CellRegister(cell_id="acme", seq=seq, sent_at=NOW, agent_version="1.0",
                        aws_account_id=account, region="eu-west-1", incarnation=incarnation,
                        installed_release="2026.11.1", template_version="1",
                        rotation_key=key)  # fmt: skip


def heartbeat(seq: int = 5, **kw: object) -> CellHeartbeat:
    return CellHeartbeat(cell_id="acme", seq=seq, sent_at=NOW - timedelta(days=1),
                         agent_version="1.0", **kw)  # fmt: skip


def maintenance(seq: int, enabled: bool) -> CellMaintenance:
    until = NOW + timedelta(minutes=15) if enabled else None
    return CellMaintenance(cell_id="acme", seq=seq, sent_at=NOW, enabled=enabled,
                           enabled_until=until)  # fmt: skip


# -- reading a record ----------------------------------------------------------------------------


def test_a_record_is_read_from_its_stored_fields_with_empty_as_absent() -> None:
    r = CellRecord.from_fields({"status": "offline", "last_seq": "7", "incarnation": "",
                                "last_heartbeat_at": NOW.isoformat()})  # fmt: skip
    assert (r.status, r.last_seq, r.incarnation, r.last_heartbeat_at) == ("offline", 7, None, NOW)
    assert CellRecord.from_fields({}).status is None
    assert CellRecord.from_fields(assumed_online(None)) == CellRecord(status="online")


# -- creating ------------------------------------------------------------------------------------


def test_create_writes_the_record_and_announces_it_once() -> None:
    cell = CellsCreate(id="acme", stage="saas", region="eu-west-1", org="acme")
    done = t.create(CellRecord(), cell, "cred1", NOW)
    assert done.outcome is Outcome.CREATED and done.read == {"status"}
    assert done.changes["status"] == "created" and done.changes["credential_id"] == "cred1"
    (created,) = done.events
    assert isinstance(created, CellCreated) and created.stage == "saas"
    again = t.create(record(status="created"), cell, "cred2", NOW)
    assert again.outcome is Outcome.EXISTS and not again.writes


# -- registration --------------------------------------------------------------------------------


def test_a_first_registration_binds_the_account_and_brings_the_cell_online() -> None:
    done = t.register(record(status="created"), register(), NOW)
    assert done.outcome is Outcome.REGISTERED
    assert done.changes["status"] == "online" and done.changes["aws_account_id"] == ACCOUNT
    assert done.changes["registered_at"] == NOW and done.changes["last_heartbeat_at"] == NOW
    (registered,) = done.events
    assert isinstance(registered, CellRegistered) and registered.org == "acme"
    assert done.read == {
        "status", "aws_account_id", "last_seq", "incarnation", "registered_at", "rotation_key"
    }  # fmt: skip


def test_the_first_key_a_cell_registers_is_bound_and_another_never_replaces_it() -> None:
    first, other = "a" * 43, "b" * 43
    bound = t.register(record(status="created"), register(key=first), NOW)
    assert bound.changes["rotation_key"] == first and not bound.foreign_rotation_key
    # A new incarnation (or a holder of the cell's URL) presenting another key: registered,
    # but the next rotated secret is still sealed to the first key.
    again = t.register(
        record(status="online", rotation_key=first, last_seq=1, incarnation="i1"),
        register(seq=2, incarnation="i2", key=other),
        NOW,
    )
    assert again.outcome is Outcome.REGISTERED and again.foreign_rotation_key
    assert "rotation_key" not in again.changes


def test_a_credential_delivered_by_hand_is_in_force_at_once_and_forgets_the_key() -> None:
    done = t.replace_credential(record(status="online", rotation_key="a" * 43), "c9")
    assert done.changes["credential_id"] == "c9" and done.changes["rotation_key"] is None
    assert done.changes["pending_credential_id"] is None


def test_a_registration_again_keeps_the_first_registration_time() -> None:
    seen = record(aws_account_id=ACCOUNT, last_seq=3, incarnation="i1",
                  registered_at=NOW - timedelta(days=3))  # fmt: skip
    done = t.register(seen, register(seq=4), NOW)
    assert done.outcome is Outcome.REGISTERED and "registered_at" not in done.changes


@pytest.mark.parametrize(
    ("status", "outcome", "reason"),
    [
        (None, Outcome.REFUSED_UNKNOWN_CELL, "cell is unknown cell"),
        ("decommissioned", Outcome.REFUSED_DECOMMISSIONED, "cell is decommissioned"),
    ],
)
def test_an_unknown_or_decommissioned_cell_is_refused_and_the_refusal_kept(
    status: str | None, outcome: Outcome, reason: str
) -> None:
    done = t.register(record(status=status), register(), NOW)
    assert done.outcome is outcome and not done.changes
    assert done.refusal is not None and done.refusal.reason == reason
    assert [type(e) for e in done.events] == [CellRegistrationRefused]
    assert done.read == {"status"}


def test_a_registration_from_another_account_is_refused() -> None:
    done = t.register(record(aws_account_id=ACCOUNT), register(account=OTHER), NOW)
    assert done.outcome is Outcome.REFUSED_ACCOUNT and not done.changes
    assert done.refusal is not None and done.refusal.aws_account_id == OTHER
    assert f"bound to AWS account {ACCOUNT}" in done.refusal.reason
    assert done.read == {"status", "aws_account_id"}


def test_a_repeated_registration_is_stale_and_a_new_incarnation_starts_over() -> None:
    seen = record(aws_account_id=ACCOUNT, last_seq=500, incarnation="i1")
    assert t.register(seen, register(seq=500), NOW).outcome is Outcome.STALE
    assert t.register(seen, register(seq=10), NOW).outcome is Outcome.STALE
    fresh = t.register(seen, register(seq=0, incarnation="i2"), NOW)
    assert fresh.outcome is Outcome.REGISTERED and fresh.changes["last_seq"] == 0


# -- heartbeats ----------------------------------------------------------------------------------


def test_a_heartbeat_records_what_the_cell_runs_on_the_registrys_clock() -> None:
    done = t.heartbeat(record(last_seq=4), heartbeat(installed_release="2026.11.2"), NOW)
    assert done.outcome is Outcome.APPLIED and done.events == ()
    assert done.changes["last_heartbeat_at"] == NOW, "never the cell's sent_at"
    assert done.changes["installed_release"] == "2026.11.2" and done.changes["last_seq"] == 5
    assert "status" not in done.changes
    assert done.newer == ("last_seq", 5)
    assert done.read == {"status", "pending_credential_id", "infra_template_version",
                         "maintenance_since"}  # fmt: skip
    assert "maintenance_since" not in done.changes, "a cell out of maintenance stays out"


@pytest.mark.parametrize(
    ("fields", "outcome"),
    [
        ({"status": None}, Outcome.UNKNOWN_CELL),
        ({"status": "created"}, Outcome.NOT_REGISTERED),
        ({"status": "decommissioned"}, Outcome.NOT_REGISTERED),
        ({"last_seq": 5}, Outcome.STALE),
        ({"last_seq": 9}, Outcome.STALE),
    ],
)
def test_heartbeats_that_change_nothing(fields: dict[str, object], outcome: Outcome) -> None:
    done = t.heartbeat(record(**fields), heartbeat(seq=5), NOW)
    assert done.outcome is outcome and not done.writes


def test_a_heartbeat_brings_an_offline_cell_back_and_announces_it() -> None:
    done = t.heartbeat(record(status="offline", last_seq=4), heartbeat(), NOW)
    assert done.outcome is Outcome.BACK_ONLINE and done.changes["status"] == "online"
    assert [type(e) for e in done.events] == [CellOnline] and done.events[0].at == NOW


def test_a_heartbeat_with_the_awaited_credential_confirms_the_rotation() -> None:
    waiting = record(pending_credential_id="new1")
    done = t.heartbeat(waiting, heartbeat(credential_id="new1"), NOW)
    assert done.confirmed_rotation
    assert done.changes["credential_id"] == "new1" and done.changes["pending_credential_id"] is None
    assert done.changes["rotation_started_at"] is None
    other = t.heartbeat(waiting, heartbeat(credential_id="old0"), NOW)
    assert not other.confirmed_rotation and "credential_id" not in other.changes


def test_the_assumed_record_is_the_one_the_guard_checks() -> None:
    """The hot path decides on an assumed online record; the write is guarded on exactly the
    fields that assumption is about, so a different record is decided again."""
    assumed = assumed_online("2")
    done = t.heartbeat(CellRecord.from_fields(assumed), heartbeat(template_version="2"), NOW)
    assert done.outcome is Outcome.APPLIED and done.events == ()
    assert done.read == set(assumed) and done.newer == ("last_seq", 5)


# -- maintenance ---------------------------------------------------------------------------------


def test_entering_maintenance_starts_the_clock_once() -> None:
    first = t.maintenance(record(), maintenance(2, True), NOW)
    assert first.outcome is Outcome.ENTERED_MAINTENANCE
    assert first.changes["maintenance_since"] == NOW and first.changes["maintenance"] is True
    renewed = t.maintenance(record(maintenance_since=NOW, last_maintenance_seq=2),
                            maintenance(3, True), NOW + timedelta(minutes=1))  # fmt: skip
    assert "maintenance_since" not in renewed.changes


def test_leaving_maintenance_adds_the_stay_to_the_total() -> None:
    done = t.maintenance(record(maintenance_since=NOW, last_maintenance_seq=2),
                         maintenance(3, False), NOW + timedelta(seconds=120))  # fmt: skip
    assert done.outcome is Outcome.LEFT_MAINTENANCE and done.maintenance_seconds == 120
    assert done.add == {"maintenance_seconds_total": 120}
    assert done.changes["maintenance_since"] is None and done.changes["maintenance"] is False
    never = t.maintenance(record(), maintenance(3, False), NOW)
    assert never.maintenance_seconds == 0


def test_a_heartbeat_out_of_maintenance_ends_a_stay_whose_end_was_not_reported() -> None:
    """The cell's 'left maintenance' report was lost: its next heartbeat ends the stay, adds it
    to the total, and a late 'entered' report (older sequence) cannot start it again."""
    stay = record(maintenance_since=NOW, last_maintenance_seq=2, last_seq=3)
    done = t.heartbeat(stay, heartbeat(seq=6, maintenance=False), NOW + timedelta(seconds=90))
    assert done.changes["maintenance_since"] is None and done.changes["maintenance"] is False
    assert done.maintenance_seconds == 90 and done.add == {"maintenance_seconds_total": 90}
    assert done.changes["last_maintenance_seq"] == 6
    assert "last_maintenance_seq" in done.read, "decided on the maintenance sequence it read"
    late = t.maintenance(record(last_maintenance_seq=6), maintenance(4, True), NOW)
    assert late.outcome is Outcome.STALE


def test_a_heartbeat_in_maintenance_starts_the_stay_a_lost_report_did_not() -> None:
    done = t.heartbeat(record(last_seq=3), heartbeat(seq=5, maintenance=True), NOW)
    assert done.changes["maintenance_since"] == NOW and done.maintenance_seconds is None
    # A renewed stay is not restarted by the heartbeats during it.
    staying = record(last_seq=5, maintenance_since=NOW, last_maintenance_seq=5)
    during = t.heartbeat(staying, heartbeat(seq=6, maintenance=True), NOW + timedelta(minutes=1))
    assert "maintenance_since" not in during.changes


def test_a_late_heartbeat_does_not_undo_a_newer_maintenance_report() -> None:
    """Left maintenance at seq 7 (reported); a heartbeat sent at seq 6, still in maintenance,
    arrives after it: the stay is not started again."""
    left = record(last_seq=5, last_maintenance_seq=7)
    done = t.heartbeat(left, heartbeat(seq=6, maintenance=True), NOW)
    assert "maintenance_since" not in done.changes and done.maintenance_seconds is None


@pytest.mark.parametrize(
    ("fields", "outcome"),
    [
        ({"status": None}, Outcome.IGNORED),
        ({"status": "decommissioned"}, Outcome.IGNORED),
        ({"last_maintenance_seq": 3}, Outcome.STALE),
    ],
)
def test_maintenance_reports_that_change_nothing(
    fields: dict[str, object], outcome: Outcome
) -> None:
    done = t.maintenance(record(**fields), maintenance(3, True), NOW)
    assert done.outcome is outcome and not done.writes


# -- liveness ------------------------------------------------------------------------------------


def test_a_silent_online_cell_goes_offline_and_is_kept() -> None:
    last = NOW - timedelta(seconds=100)
    done = t.go_offline(record(last_heartbeat_at=last), "acme", NOW - timedelta(seconds=90), NOW)
    assert done.outcome is Outcome.OFFLINE and done.changes == {"status": "offline"}
    (offline,) = done.events
    assert isinstance(offline, CellOffline) and offline.last_heartbeat_at == last
    assert done.read == {"status", "last_heartbeat_at"}


def test_a_heartbeat_after_the_cutoff_or_a_cell_not_online_is_not_taken_offline() -> None:
    cutoff = NOW - timedelta(seconds=90)
    fresh = t.go_offline(record(last_heartbeat_at=NOW), "acme", cutoff, NOW)
    assert fresh.outcome is Outcome.APPLIED and not fresh.writes
    gone = t.go_offline(record(status="decommissioned"), "acme", cutoff, NOW)
    assert gone.outcome is Outcome.NOT_ONLINE and gone.events == ()
    assert gone.changes == {"status": "decommissioned"}, "written as it is: only the index moves"


# -- credentials and decommissioning -------------------------------------------------------------


def test_a_rotation_starts_and_ends_with_the_new_credential_in_force() -> None:
    started = t.start_rotation(record(), "new1", NOW)
    assert started.outcome is Outcome.ROTATION_STARTED
    assert started.changes == {"pending_credential_id": "new1", "rotation_started_at": NOW}
    assert t.start_rotation(record(status="decommissioned"), "x", NOW).outcome is (
        Outcome.ALREADY_DECOMMISSIONED
    )
    ended = t.end_rotation(record(pending_credential_id="new1"))
    assert ended.changes == {"rotation_started_at": None, "credential_id": "new1",
                             "pending_credential_id": None}  # fmt: skip


def test_decommissioning_keeps_the_record_and_happens_once() -> None:
    done = t.decommission(record(pending_credential_id="p"), "acme", NOW)
    assert done.outcome is Outcome.DECOMMISSIONED and [type(e) for e in done.events] == [
        CellDecommissioned
    ]
    assert done.changes["status"] == "decommissioned" and done.changes["decommissioned_at"] == NOW
    assert done.changes["pending_credential_id"] is None
    assert t.decommission(record(status="decommissioned"), "acme", NOW).outcome is (
        Outcome.ALREADY_DECOMMISSIONED
    )
    assert t.decommission(CellRecord(), "acme", NOW).outcome is Outcome.UNKNOWN_CELL


def test_a_heartbeat_on_another_template_version_announces_it() -> None:
    done = t.heartbeat(record(infra_template_version="1"), heartbeat(template_version="2"), NOW)
    assert [type(e) for e in done.events] == [CellTemplateChanged]
    changed = done.events[0]
    assert isinstance(changed, CellTemplateChanged)
    assert (changed.template_version, changed.previous_version) == ("2", "1")
    back = t.heartbeat(record(status="offline", infra_template_version="1"),
                       heartbeat(template_version="2"), NOW)  # fmt: skip
    assert [type(e) for e in back.events] == [CellOnline, CellTemplateChanged]


def test_compliance_is_recorded_in_the_order_it_was_decided() -> None:
    later = InfraComplianceChanged(at=NOW, cell_id="acme", status="out_of_sla",
                                   deadline=NOW, required_version="2")  # fmt: skip
    done = t.compliance(record(), later)
    assert done.changes["compliance"] == "out_of_sla" and done.newer is not None
    seen = record(compliance_at=NOW.timestamp())
    assert t.compliance(seen, later).outcome is Outcome.STALE
    assert t.compliance(CellRecord(), later).outcome is Outcome.IGNORED


def test_debug_access_reports_become_audit_lines_and_nothing_else() -> None:
    msg = CellDebugAccess(cell_id="acme", seq=9, sent_at=NOW, action="granted",
                          role_arn="arn:aws:iam::123456789012:role/substrate-debug/x",
                          expires_at=NOW + timedelta(hours=2), reason="incident 42",
                          granted_by="alice")  # fmt: skip
    done = t.debug_access(record(), msg)
    assert done.outcome is Outcome.AUDITED and not done.changes and done.events == ()
    assert done.audit is not None and (done.audit.seq, done.audit.reason) == (9, "incident 42")
    assert t.debug_access(CellRecord(), msg).outcome is Outcome.UNKNOWN_CELL
