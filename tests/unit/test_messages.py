"""The wire contract: names, routing, validation and the published schema."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from common import requests
from common.fields import WIRE_INT_MAX, cell_id_problem
from common.messages import (
    CELL_REPORT_KINDS,
    MESSAGES,
    CellHeartbeat,
    CellRegistered,
    CellUpgrade,
    DesiredState,
    RpcRequest,
    command_queue,
    json_schema,
)
from common.releases import Component, Release

NOW = datetime(2026, 11, 26, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64


def test_every_architecture_message_has_a_versioned_wire_name() -> None:
    expected = {
        "cell.register.v1", "cell.heartbeat.v1", "cell.upgrade.v1", "cell.maintenance.v1",
        "cell.debug-access.v1", "cell.sync.v1", "cell.registered.v1", "cell.offline.v1",
        "cell.online.v1", "cell.decommissioned.v1", "release.published.v1",
        "rollout.progressed.v1", "rollout.halted.v1", "rollout.completed.v1", "flags.changed.v1",
        "infra.template-published.v1", "infra.compliance-changed.v1",
        "command.desired-state.v1", "command.flags-snapshot.v1",
        "command.rotate-credentials.v1", "rpc.request.v1", "rpc.reply.v1",
    }  # fmt: skip
    assert expected <= set(MESSAGES)
    assert set(CELL_REPORT_KINDS) == {
        "register", "heartbeat", "upgrade", "maintenance", "debug-access", "sync"
    }  # fmt: skip


def test_routing_keys_follow_the_topology() -> None:
    hb = CellHeartbeat(cell_id="acme-prod", seq=1, sent_at=NOW, agent_version="1")
    assert (hb.exchange, hb.routing_key()) == ("substrate.cells", "acme-prod.heartbeat")
    event = CellRegistered(
        cell_id="acme-prod", stage="dedicated", region="eu-west-1", org="acme",
        aws_account_id="123456789012", agent_version="1", at=NOW,
    )  # fmt: skip
    assert (event.exchange, event.routing_key()) == ("substrate.events", "cell.registered")
    cmd = DesiredState(cell_id="acme-prod", issued_at=NOW, generation=3, release=None)
    assert (cmd.exchange, cmd.routing_key()) == ("substrate.commands", "acme-prod")
    assert command_queue("acme-prod") == "cell.acme-prod.commands"
    req = RpcRequest(service="registry", method="cells.list")
    assert (req.exchange, req.routing_key()) == ("substrate.rpc", "registry")


@pytest.mark.parametrize(
    ("cell_id", "problem"),
    [
        ("acme-prod", None),
        ("a1b", None),
        ("ab", "DNS label"),
        ("Acme", "DNS label"),
        ("acme.prod", "DNS label"),
        ("acme-", "DNS label"),
        ("9acme", "DNS label"),
        ("a" * 43, "DNS label"),
        ("svc-registry", "reserved prefix 'svc-'"),
        ("op-alice", "reserved prefix 'op-'"),
    ],
)
def test_cell_ids_are_dns_labels_outside_reserved_prefixes(
    cell_id: str, problem: str | None
) -> None:
    found = cell_id_problem(cell_id)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        with pytest.raises(ValidationError, match="cell_id"):
            CellHeartbeat(cell_id=cell_id, seq=1, sent_at=NOW, agent_version="1")


def test_messages_are_frozen_and_ignore_unknown_fields() -> None:
    body = CellHeartbeat(cell_id="acme-prod", seq=1, sent_at=NOW, agent_version="1")
    with pytest.raises(ValidationError):
        body.seq = 2  # type: ignore[misc]
    newer = body.model_dump(mode="json") | {"field_from_the_future": 1}
    assert CellHeartbeat.model_validate(newer) == body


def test_release_validation_names_the_field() -> None:
    with pytest.raises(ValidationError, match=r"components\.0\.digest"):
        Release.model_validate(
            {
                "version": "2026.11.3",
                "components": [{"name": "server", "image": "x", "digest": "md5:1"}],
            }
        )
    with pytest.raises(ValidationError, match="components"):
        Release(version="2026.11.3", components=())
    ok = Release(
        version="2026.11.3", components=(Component(name="server", image="r/s", digest=DIGEST),)
    )
    assert ok.reversible and not ok.components[0].requires_maintenance


def test_timestamps_must_carry_a_zone() -> None:
    with pytest.raises(ValidationError, match="sent_at"):
        CellHeartbeat(cell_id="acme-prod", seq=1, sent_at=datetime(2026, 1, 1), agent_version="1")


def test_json_schema_documents_every_message() -> None:
    schema = json_schema()
    assert set(schema["messages"]) == set(MESSAGES)
    for name, entry in schema["messages"].items():
        model = entry["$ref"].rsplit("/", 1)[1]
        assert model in schema["$defs"], name
    heartbeat = schema["$defs"]["CellHeartbeat"]
    assert {"cell_id", "seq", "sent_at", "agent_version"} <= set(heartbeat["required"])


def test_only_requests_that_change_nothing_are_sent_again_after_a_nack() -> None:
    """bus.call sends a read-only request again while the broker nacks it; a request that
    changes something must never be one (a new method is a write until marked otherwise)."""
    requests.json_schema()  # imports every service's methods
    writes = {method for (_, method), cls in requests.REQUESTS.items() if not cls.read_only}
    assert writes == {
        "cells.create", "cells.rotate_credentials", "cells.decommission", "cells.pin",
        "cells.unpin", "release.publish", "rollout.pause", "rollout.resume", "rollout.abort",
        "rollout.policy.set", "flags.set", "flags.delete", "infra.publish",
        "operators.add", "operators.set_role", "operators.remove", "rollout.approve",
        "rollout.promote", "rollout.retry", "rollout.schedule", "flags.enable", "flags.approve",
        "flags.cancel", "windows.set", "windows.clear",
    }  # fmt: skip
    assert requests.Status.read_only and requests.REQUESTS[("rollout", "rollout.status")].read_only


def test_a_viewer_reads_an_operator_writes_an_admin_manages_cells_operators_policy() -> None:
    requests.json_schema()  # imports every service's methods
    needs = {method: cls.needs for (_, method), cls in requests.REQUESTS.items()}
    assert {m for m, role in needs.items() if role == "admin"} == {
        "cells.create", "cells.rotate_credentials", "cells.decommission", "rollout.policy.set",
        "operators.add", "operators.set_role", "operators.remove",
    }  # fmt: skip
    for (_, method), cls in requests.REQUESTS.items():
        if cls.read_only:
            assert cls.needs == "viewer", method
        else:
            assert cls.needs in ("operator", "admin"), method


def _unbounded_integers(schema: object, where: str) -> list[str]:
    """Every integer in a JSON Schema without a maximum the guards compare exactly."""
    found = []
    if isinstance(schema, dict):
        if schema.get("type") == "integer" and schema.get("maximum", 2**64) > WIRE_INT_MAX:
            found.append(where)
        for key, value in schema.items():
            found += _unbounded_integers(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found += _unbounded_integers(value, f"{where}[{i}]")
    return found


def test_every_whole_number_on_the_wire_is_one_the_guards_compare_exactly() -> None:
    """Redis's Lua compares numbers as doubles: a number past 2**53 compares one way there and
    another in Python, and a write guarded on it is refused for ever. Every whole number a
    message carries is bounded below that, so the two always agree."""
    unbounded = [
        where
        for name, model in MESSAGES.items()
        for where in _unbounded_integers(model.model_json_schema(), name)
    ]
    assert unbounded == []
    assert WIRE_INT_MAX * 8 < 2**53  # room for a report order: generation times the phases


@pytest.mark.parametrize("field", ["seq", "applied_generation", "flags_snapshot_version"])
def test_a_number_past_the_bound_is_refused_naming_the_field(field: str) -> None:
    fields = {"cell_id": "acme-1", "seq": 1, "sent_at": NOW, "agent_version": "1"}
    CellHeartbeat.model_validate({**fields, field: WIRE_INT_MAX})
    for bad in (WIRE_INT_MAX + 1, 10**30, -5):
        with pytest.raises(ValidationError) as refused:
            CellHeartbeat.model_validate({**fields, field: bad})
        assert refused.value.errors()[0]["loc"] == (field,)


def test_names_a_cell_sends_are_refused_unless_they_are_names_naming_the_field() -> None:
    fields = {"cell_id": "acme-1", "seq": 1, "sent_at": NOW, "agent_version": "1"}
    for field, bad in (
        ("agent_version", "1\x1b[2J"),
        ("installed_release", "x" * 65),
        ("template_version", "2\n"),
        ("credential_id", "id with spaces"),
    ):
        with pytest.raises(ValidationError) as refused:
            CellHeartbeat.model_validate({**fields, field: bad})
        assert refused.value.errors()[0]["loc"] == (field,)


def test_free_text_a_cell_sends_is_kept_printable_and_cut_to_its_length() -> None:
    failed = CellUpgrade(
        cell_id="acme-1", seq=1, sent_at=NOW, generation=1, release_version="1.0",
        phase="failed", error="apply failed\x1b[2J\r\n" + "x" * 2000,
    )  # fmt: skip
    assert failed.error is not None
    assert failed.error.startswith("apply failed\\x1b[2J\\x0d\\x0a")
    assert len(failed.error) == 1000
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in failed.error)
