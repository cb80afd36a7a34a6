"""Settings, clock, topology arguments, the metrics server and CLI output."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiormq
import pydantic
import pydantic_core.core_schema
import pytest
from pydantic import ValidationError

from cell_agent.settings import AgentSettings
from common import broker_urls
from common.clock import FakeClock
from common.messages import CELLS_EXCHANGE
from common.metrics import MetricsServer, Response
from common.settings import EnvSettings, ServiceSettings, load
from common.topology import (
    DELIVERY_LIMIT,
    SERVICE_QUEUES,
    Binding,
    cell_commands,
    control_plane,
    dead_letter_name,
)
from services.infra_compliance.settings import InfraSettings
from services.rollout.settings import RolloutSettings
from substratectl.output import fields, table


def _refused(settings_cls: type[EnvSettings], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``load`` said, having exited 2."""
    with pytest.raises(SystemExit) as exited:
        load(settings_cls)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_missing_setting_exits_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SUBSTRATE_AMQP_URL", raising=False)
    monkeypatch.setenv("SUBSTRATE_REDIS_URL", "redis://x/0")
    monkeypatch.setenv("SUBSTRATE_METRICS_PORT", "not-a-port")
    err = _refused(ServiceSettings, capsys)
    assert "SUBSTRATE_AMQP_URL is not set" in err
    assert "SUBSTRATE_METRICS_PORT is invalid" in err


def test_settings_are_read_as_pydantic_settings_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment reader that replaced pydantic-settings: the prefix, any case, JSON for a
    container, an alias's choices in order, and what the constructor is given first."""
    monkeypatch.setenv("SUBSTRATE_AMQP_URL", "amqp://u:p@node1/")
    monkeypatch.setenv("substrate_redis_url", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("SUBSTRATE_CELL_BUDGETS", '{"sync": [1, 20]}')
    monkeypatch.setenv("SUBSTRATE_DECLARE_TOPOLOGY", "false")
    monkeypatch.setenv("SUBSTRATE_TICK_SECONDS", "2.5")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    monkeypatch.delenv("AWS_REGION", raising=False)
    infra = load(InfraSettings)
    assert infra.redis_url == "redis://127.0.0.1:6379/3"
    assert infra.cell_budgets == {"sync": (1.0, 20.0)}
    assert infra.declare_topology is False and infra.tick_seconds == 2.5
    assert infra.aws_region == "eu-west-2"
    monkeypatch.setenv("AWS_REGION", "us-west-1")
    assert load(InfraSettings).aws_region == "us-west-1", "the first choice wins"
    given = InfraSettings.model_validate({"tick_seconds": 9})
    assert given.tick_seconds == 9, "what the constructor is given before the variable"
    # A service's settings made from the common ones keep them and read their own.
    common = ServiceSettings.model_validate({"rpc_timeout_seconds": 7})
    copied = RolloutSettings(**common.model_dump())
    assert copied.rpc_timeout_seconds == 7 and copied.tick_seconds == 2.5
    assert InfraSettings(**infra.model_dump()).aws_region == "eu-west-2", "given, not read"
    with pytest.raises(ValidationError, match="frozen"):
        infra.tick_seconds = 1  # type: ignore[misc]


def test_a_variable_that_is_not_json_where_json_is_wanted_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SUBSTRATE_AMQP_URL", "amqp://u:p@node1/")
    monkeypatch.setenv("SUBSTRATE_REDIS_URL", "redis://x/0")
    monkeypatch.setenv("SUBSTRATE_CELL_BUDGETS", "sync=1")
    assert _refused(ServiceSettings, capsys) == (
        "error: setting SUBSTRATE_CELL_BUDGETS is invalid: Input should be a valid dictionary\n"
    )


def test_a_check_across_agent_settings_says_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CELL_ID", "c-1")
    monkeypatch.setenv("CELL_AMQP_URL", "amqp://c-1:pw@broker/")
    monkeypatch.setenv("CELL_STATE_DIR", "/tmp")
    monkeypatch.setenv("CELL_APPLIER", "command")
    monkeypatch.delenv("CELL_APPLY_COMMAND", raising=False)
    assert _refused(AgentSettings, capsys) == (
        "error: settings are invalid: Value error, CELL_APPLIER=command needs CELL_APPLY_COMMAND\n"
    )


def test_broker_user_is_read_from_the_url() -> None:
    assert broker_urls.user("amqp://svc-registry:pw@host/") == "svc-registry"
    assert broker_urls.user("amqp://acme%2Dprod:p%40ss@host/vh") == "acme-prod"


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    before = clock.now()
    assert clock.now() == before
    clock.advance(90)
    assert (clock.now() - before).total_seconds() == 90
    assert clock.monotonic() == 90
    with pytest.raises(ValueError, match="aware"):
        clock.set(datetime(2026, 1, 2))


def test_every_consuming_queue_is_quorum_with_a_delivery_limit_and_a_dead_letter_queue() -> None:
    plane = control_plane()
    names = {q.name for q in plane.queues}
    consuming = [q for q in plane.queues if not q.name.endswith(".dead")]
    assert consuming
    for queue in consuming:
        args = queue.arguments()
        assert args["x-queue-type"] == "quorum"
        assert args["x-delivery-limit"] == DELIVERY_LIMIT
        assert args["x-dead-letter-routing-key"] == dead_letter_name(queue.name)
        assert dead_letter_name(queue.name) in names
    assert {"registry.rpc", "rollout.rpc", "flags.rpc", "infra_compliance.rpc"} <= names
    assert set(SERVICE_QUEUES) == {"registry", "rollout", "flags", "infra_compliance"}


def test_upgrade_reports_go_to_the_services_that_use_them_only() -> None:
    """Rollout and flags follow upgrades; the registry's queue no longer takes them (an earlier
    version bound it, so declaring the topology removes that binding)."""
    upgrade = Binding(CELLS_EXCHANGE, "*.upgrade")
    queues = {q.name: q for q in control_plane().queues}
    bound = {name for name, q in queues.items() if upgrade in q.bindings}
    assert bound == {"rollout.cells", "flags.cells"}
    assert queues["registry.cells"].retired == (upgrade,)


def test_a_cell_command_queue_is_bound_to_its_own_id_and_the_broadcast_only() -> None:
    topo = cell_commands("acme-prod")
    queue = next(q for q in topo.queues if q.name == "cell.acme-prod.commands")
    assert [(b.exchange, b.routing_key) for b in queue.bindings] == [
        ("substrate.commands", "acme-prod"), ("substrate.broadcast", ""),
    ]  # fmt: skip
    assert queue.arguments()["x-dead-letter-routing-key"] == "cell.commands.dead"


async def _request(port: int, method: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _get(port: int, path: str) -> tuple[int, bytes]:
    return await _request(port, "GET", path)


async def test_metrics_server_serves_metrics_health_and_routes() -> None:
    healthy = {"ok": True}
    server = MetricsServer(lambda: dict(healthy))

    async def gate(tail: str) -> Response:
        return Response.json(503, {"tail": tail})

    server.route("/gate", gate)
    await server.start()
    try:
        status, body = await _get(server.port, "/metrics")
        assert status == 200 and b"# HELP" in body
        assert (await _get(server.port, "/healthz"))[0] == 200
        # A monitor's HEAD is answered as its GET, without the body.
        assert await _request(server.port, "HEAD", "/healthz") == (200, b"")
        healthy["ok"] = False
        assert (await _get(server.port, "/healthz"))[0] == 503
        status, body = await _get(server.port, "/gate/start")
        assert status == 503 and json.loads(body) == {"tail": "start"}
        # The route gets the path URL-decoded.
        assert json.loads((await _get(server.port, "/gate/a%20b"))[1]) == {"tail": "a b"}
        status, body = await _get(server.port, "/nowhere")
        assert status == 404 and "error" in json.loads(body)
        status, body = await _request(server.port, "DELETE", "/healthz")
        assert status == 405 and "error" in json.loads(body)
    finally:
        await server.stop()


def test_table_aligns_columns_and_shows_missing_values() -> None:
    out = table([{"id": "a", "n": None}, {"id": "bbb", "n": True}], ["id", "n"])
    assert out.splitlines() == ["ID   N", "a    -", "bbb  yes"]


def test_status_details_read_as_one_line() -> None:
    from common.requests import ServiceStatus
    from substratectl.control_plane import ServiceRow, status_line

    detail = {"service": "registry", "ready": True, "cells": {"online": 3, "offline": 0}}
    row = status_line(ServiceRow("registry", True, ServiceStatus.model_validate(detail)))
    assert row == "ready, cells: 3 online"
    detail = {"service": "r", "ready": True, "cells": {}}
    empty = status_line(ServiceRow("r", True, ServiceStatus.model_validate(detail)))
    assert empty == "ready, cells: none"
    detail = {"service": "infra_compliance", "ready": True, "newest_template": None}
    nothing = status_line(
        ServiceRow("infra_compliance", True, ServiceStatus.model_validate(detail))
    )
    assert nothing == "ready, newest_template: none", "never Python's None"
    down = status_line(ServiceRow("flags", False, "did not answer"))
    assert down == "did not answer"


def test_tables_and_records_print_control_characters_as_visible_escapes() -> None:
    """Whatever a cell reported reaches an operator's terminal as text, never as a sequence
    the terminal would act on (clear the screen, move the cursor, retitle the window)."""
    evil = "stack\x1b[2J\x07\x9b31m"
    shown = table([{"id": "a", "stack": evil}], ["id", "stack"]) + fields({"stack": evil})
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert "stack\\x1b[2J\\x07\\x9b31m" in shown


def test_the_installer_compiles_the_dependencies_a_command_imports() -> None:
    """Where bytecode cannot be written back (PYTHONDONTWRITEBYTECODE, a read-only image), a
    dependency installed without it is compiled again by every process that imports it."""
    uncompiled = [
        module.__name__
        for module in (aio_pika, aiormq, pydantic, pydantic_core.core_schema)
        if module.__file__ is None
        or not Path(importlib.util.cache_from_source(module.__file__)).is_file()
    ]
    assert uncompiled == []
