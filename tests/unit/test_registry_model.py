"""The registry's pure decisions: input validation, broker grants, URLs, sender checks."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from common.bus.errors import Refused, refuse_foreign_sender
from common.messages import CellHeartbeat, Delivery
from common.requests.registry import CellsCreate
from services.registry.model import (
    broker_grant,
    cell_amqp_url,
    offline_cutoff,
    stack_parameters,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"id": "Bad_Id", "stage": "saas", "region": "eu-west-1", "org": "a"}, "id"),
        ({"id": "op-admin", "stage": "saas", "region": "eu-west-1", "org": "a"}, "id"),
        ({"id": "acme", "stage": "prod", "region": "eu-west-1", "org": "a"}, "stage"),
        ({"id": "acme", "stage": "saas", "region": "mars", "org": "a"}, "region"),
        ({"id": "acme", "stage": "saas", "region": "eu-west-1", "org": ""}, "org"),
        (
            {"id": "acme", "stage": "saas", "region": "eu-west-1", "org": "a", "aws_account": "1"},
            "aws_account",
        ),
        ({"id": "acme", "stage": "saas", "region": "eu-west-1", "org": "a", "x": 1}, "x"),
    ],
)
def test_create_cell_errors_name_the_field(params: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CellsCreate.model_validate(params)
    assert [e["loc"][0] for e in caught.value.errors()] == [field]


def test_broker_grant_lets_a_cell_write_only_its_own_reports_and_read_only_its_queue() -> None:
    grant = broker_grant("acme-prod")
    assert grant.configure == "^$"
    assert re.fullmatch(grant.write, "substrate.cells")
    assert not re.fullmatch(grant.write, "substrate.events")
    assert not re.fullmatch(grant.write, "substratexcells")
    assert re.fullmatch(grant.read, "cell.acme-prod.commands")
    assert not re.fullmatch(grant.read, "cell.acme-prodx.commands")
    assert not re.fullmatch(grant.read, "cell.acme-pro.commands")
    topic = grant.topic_write.replace("{username}", "acme-prod")
    for kind in ("register", "heartbeat", "upgrade", "maintenance", "debug-access", "sync"):
        assert re.fullmatch(topic, f"acme-prod.{kind}")
    assert not re.fullmatch(topic, "other.heartbeat")
    assert not re.fullmatch(topic, "acme-prod.heartbeat.extra")
    assert not re.fullmatch(topic, "acme-prod.decommission")


def test_cell_url_and_stack_parameters() -> None:
    url = cell_amqp_url("amqps://svc:x@broker.example.com:5671/substrate", "acme", "p/w@")
    assert url == "amqps://acme:p%2Fw%40@broker.example.com:5671/substrate"
    cell = CellsCreate(id="acme", stage="dedicated", region="eu-west-1", org="acme")
    params = stack_parameters(cell, url, "com.amazonaws.vpce.eu-west-1.vpce-svc-1")
    assert params == {
        "CellId": "acme",
        "Stage": "dedicated",
        "ControlPlaneEndpoint": "broker.example.com:5671",
        "ControlPlaneVhost": "substrate",
        "ControlPlaneServiceName": "com.amazonaws.vpce.eu-west-1.vpce-svc-1",
        "AgentPassword": "p/w@",
    }
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    with_ca = stack_parameters(cell, url, "svc", pem)
    assert base64.b64decode(with_ca["ControlPlaneCaCertificate"]).decode() == pem


def test_offline_cutoff_uses_the_receivers_clock() -> None:
    assert (NOW - offline_cutoff(NOW, 90)).total_seconds() == 90


def _delivery(user_id: str | None, routing_key: str) -> Delivery:
    return Delivery(
        message_id="m",
        user_id=user_id,
        routing_key=routing_key,
        redelivered=False,
        delivery_count=0,
    )


def _refused(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("substrate_cell_messages_refused_total", {"reason": reason}) or 0
    )


@pytest.mark.parametrize(
    ("user_id", "routing_key", "problem", "reason"),
    [
        ("acme", "acme.heartbeat", None, None),
        (None, "acme.heartbeat", "no user_id", "missing_user_id"),
        ("other", "acme.heartbeat", "user 'other'", "user_mismatch"),
        ("acme", "acme.sync", "routing key", "routing_key_mismatch"),
    ],
)
def test_a_cell_may_speak_only_for_itself(
    user_id: str | None, routing_key: str, problem: str | None, reason: str | None
) -> None:
    """Every service that consumes cell reports refuses and counts a forged one the same way."""
    msg = CellHeartbeat(cell_id="acme", seq=1, sent_at=NOW, agent_version="1")
    reasons = ("missing_user_id", "user_mismatch", "routing_key_mismatch")
    before = {r: _refused(r) for r in reasons}
    if problem is None:
        refuse_foreign_sender(msg, _delivery(user_id, routing_key))
    else:
        with pytest.raises(Refused, match=problem):
            refuse_foreign_sender(msg, _delivery(user_id, routing_key))
    assert {r: _refused(r) - before[r] for r in reasons} == {r: int(r == reason) for r in reasons}
