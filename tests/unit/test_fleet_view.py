"""The fleet view's ordering rule, pure: each source in its own order, decommissioned for good,
and one encoding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.fleet import FleetCell, apply_fact
from common.messages import (
    CellCreated,
    CellDecommissioned,
    CellOffline,
    CellOnline,
    CellRegistered,
    CellUpgrade,
    InfraComplianceChanged,
)
from common.report_order import report_order
from common.vocabulary import UpgradePhase

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def registered(seconds: float, installed: str | None = None) -> CellRegistered:
    return CellRegistered(at=at(seconds), cell_id="acme", stage="dedicated", region="eu-west-1",
                          org="acme", aws_account_id="123456789012", agent_version="1.0",
                          installed_release=installed)  # fmt: skip


def upgrade(generation: int, phase: UpgradePhase = "succeeded", version: str = "2") -> CellUpgrade:
    return CellUpgrade(cell_id="acme", seq=generation, sent_at=at(-86400), generation=generation,
                       release_version=version, phase=phase)  # fmt: skip


def fold(*messages: object) -> FleetCell | None:
    cell: FleetCell | None = None
    for msg in messages:
        new = apply_fact(cell, "acme", msg)  # type: ignore[arg-type]
        cell = new or cell
    return cell


def test_registry_events_are_kept_in_the_order_they_happened() -> None:
    created = CellCreated(at=at(0), cell_id="acme", stage="saas", region="eu-west-1", org="a")
    cell = fold(created, registered(1), CellOnline(at=at(3), cell_id="acme"),
                CellOffline(at=at(2), cell_id="acme"))  # fmt: skip
    assert cell is not None and cell.status == "online", "the older offline event is dropped"
    assert cell.known and cell.stage == "dedicated"


def test_a_cell_heard_of_only_through_liveness_is_not_known_yet() -> None:
    cell = fold(CellOnline(at=at(1), cell_id="acme"))
    assert cell is not None and not cell.known
    assert fold(CellOnline(at=at(1), cell_id="acme"), registered(0)) is not None


def test_decommissioned_stays_decommissioned() -> None:
    gone = fold(registered(0), CellDecommissioned(at=at(5), cell_id="acme"))
    assert gone is not None and gone.status == "decommissioned"
    assert apply_fact(gone, "acme", registered(9)) is None
    assert apply_fact(gone, "acme", upgrade(3)) is None


def test_upgrades_are_ordered_by_generation_not_by_any_clock() -> None:
    cell = fold(registered(10, installed="1"), upgrade(5, version="3"), upgrade(4, version="2"))
    assert cell is not None and cell.installed_release == "3"
    assert cell.release_generation == report_order(5, "succeeded")
    assert apply_fact(cell, "acme", upgrade(5, version="3")) is None, "a duplicate changes nothing"
    assert apply_fact(cell, "acme", upgrade(6, phase="failed")) is None, "only a success counts"


def test_a_rollback_after_a_bad_verdict_runs_the_previous_release_again() -> None:
    applied = fold(registered(0, installed="1"), upgrade(5, version="2"))
    unhealthy = CellUpgrade(cell_id="acme", seq=9, sent_at=at(0), generation=5,
                            release_version="2", phase="rolled_back", verdict="unhealthy",
                            check="errors", installed_release="1")  # fmt: skip
    cell = fold(applied, unhealthy)
    assert cell is not None and cell.installed_release == "1"
    assert apply_fact(cell, "acme", upgrade(5, version="2")) is None, "the success is older"


def test_a_new_incarnation_starts_its_upgrade_reports_afresh() -> None:
    first = registered(0, installed="1").model_copy(update={"incarnation": "a"})
    cell = fold(first, upgrade(7, version="2"))
    again = registered(5).model_copy(update={"incarnation": "b"})
    cell = fold(cell, again)
    assert cell is not None and cell.installed_release is None and cell.incarnation == "b"
    # Its first install may carry a generation the last incarnation already reported.
    cell = fold(cell, upgrade(7, version="2"))
    assert cell is not None and cell.installed_release == "2"


def test_compliance_has_its_own_order_beside_the_registrys() -> None:
    held = InfraComplianceChanged(at=at(100), cell_id="acme", status="out_of_sla",
                                  template_version="1", required_version="2")  # fmt: skip
    late_offline = CellOffline(at=at(50), cell_id="acme")
    cell = fold(registered(0), held, late_offline)
    assert cell is not None and cell.held and cell.status == "offline"
    older = InfraComplianceChanged(at=at(90), cell_id="acme", status="compliant")
    assert apply_fact(cell, "acme", older) is None


def test_a_cell_is_stored_as_one_compact_value() -> None:
    cell = fold(registered(0, installed="2026.11.1"), upgrade(2, version="2026.11.2"))
    assert cell is not None
    assert FleetCell.decode(cell.encode()) == cell
    assert cell.encode().startswith('["acme","dedicated"')


def test_reports_order_by_generation_then_by_phase_with_outcomes_last() -> None:
    order = [report_order(1, p) for p in ("accepted", "verifying", "applying", "succeeded")]
    assert order == sorted(order) and len(set(order)) == 4
    assert report_order(1, "failed") == report_order(1, "rolled_back") == order[-1]
    assert report_order(2, "accepted") > report_order(1, "succeeded")
