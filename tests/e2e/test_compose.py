"""`docker compose up` as a user runs it, on a real Docker engine: the project's own script
installs the engine where it is missing and builds stand-ins for the official images (no image
can be pulled here), testcontainers' compose support brings the whole stack up, the five demo
cells come online and take the demo release, Prometheus scrapes every service, and nothing the
test started (containers, network, volume, dockerd) is left behind."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testcontainers.compose import DockerCompose

from deploy import demo
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import BIN

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "op-admin:op-admin-demo-password"  # compose's demo operator (deploy/rabbitmq.py)
SERVICE_JOBS = {
    "substrate-registry", "substrate-rollout", "substrate-flags", "substrate-infra-compliance"
}  # fmt: skip


def _engine_answers() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(
        ["docker", "info"], capture_output=True, check=False
    ).returncode == 0  # fmt: skip


@pytest.fixture(scope="module")
def docker() -> Iterator[None]:
    """The engine, Compose and the images, by scripts/docker.sh (idempotent: a machine that has
    them spends seconds here). A dockerd this fixture started is stopped after; one that was
    already running is left running."""
    was_running = _engine_answers()
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "docker.sh")], capture_output=True,
                           text=True, timeout=1200, check=False)  # fmt: skip
    assert setup.returncode == 0, f"scripts/docker.sh failed:\n{setup.stdout}\n{setup.stderr}"
    try:
        yield
    finally:
        if not was_running:
            subprocess.run(["bash", str(ROOT / "scripts" / "docker.sh"), "stop"], check=True,
                           timeout=120)  # fmt: skip
            assert not _engine_answers(), "the dockerd this test started is still running"


async def _ctl(amqp_url: str, *args: str) -> Any:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "substratectl"), "--json", *args,
        env={**os.environ, "SUBSTRATE_AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return json.loads(out) if process.returncode == 0 and out.strip() else None


def _query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            result: list[Any] = json.load(answer)["data"]["result"]
    except OSError:
        return []
    return result


def _connections(port: int) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/connections")
    user, password = OPERATOR.split(":")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        found: list[dict[str, Any]] = json.load(answer)
    return found


def _leftovers(project: str) -> list[str]:
    """Containers, networks and volumes compose labelled with this project."""
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        out = subprocess.run(["docker", *kind, "-q", "--filter", label], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        found += out.split()
    return found


@pytest.mark.e2e
async def test_compose_up_runs_the_demo_fleet_and_down_leaves_nothing(
    docker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = f"substrate-test-{uuid.uuid4().hex[:6]}"
    amqp_port, console_port, prometheus_port = free_port(), free_port(), free_port()
    # compose reads these from the environment testcontainers runs it in: the machine's own
    # broker already holds 5672 and 15672.
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", project)
    monkeypatch.setenv("SUBSTRATE_AMQP_PORT", str(amqp_port))
    monkeypatch.setenv("SUBSTRATE_CONSOLE_PORT", str(console_port))
    monkeypatch.setenv("SUBSTRATE_AMQPS_PORT", str(free_port()))
    monkeypatch.setenv("SUBSTRATE_PROMETHEUS_PORT", str(prometheus_port))
    # No reaper (its image cannot be pulled); teardown below removes what the run made.
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    stack = DockerCompose(ROOT / "compose", compose_file_name="docker-compose.yml",
                          build=True, pull=False, wait=True)  # fmt: skip
    operator = f"amqp://{OPERATOR}@127.0.0.1:{amqp_port}/"
    try:
        # `up --build --wait`: returns once every health check passes and the demo job exited 0.
        await asyncio.to_thread(stack.start)
        cells = [cell_id for cell_id, _ in demo.FLEET]

        async def fleet() -> dict[str, dict[str, Any]] | None:
            listed = await _ctl(operator, "cells", "list")
            by_id = {c["id"]: c for c in listed or []}
            return by_id if all(
                by_id.get(c, {}).get("status") == "online" for c in cells) else None  # fmt: skip

        await eventually(fleet, timeout=120, interval=1, what="the five demo cells online")

        # Every cell's connection is AMQPS (the agents verified the broker against the demo CA).
        # The management API lists connections from statistics it collects every few seconds.
        async def over_tls() -> dict[str, object] | None:
            connections = await asyncio.to_thread(_connections, console_port)
            by_cell = {str(c["user"]): c.get("ssl") for c in connections if c.get("user") in cells}
            return by_cell if set(by_cell) == set(cells) else None

        by_cell = await eventually(over_tls, timeout=60, interval=1, what="cells' connections")
        assert by_cell == dict.fromkeys(cells, True), by_cell

        async def released() -> bool:
            status = await _ctl(operator, "rollout", "status", demo.VERSION)
            on_all = (await fleet() or {}).values()
            return bool(status) and status["state"] == "completed" and len(on_all) == 5 and all(
                c["installed_release"] == demo.VERSION for c in on_all)  # fmt: skip

        await eventually(released, timeout=240, interval=2,
                         what=f"the demo release {demo.VERSION} on all five cells")  # fmt: skip

        # Prometheus scrapes every service (and the broker), and sees the five cells online.
        async def scraped() -> bool:
            up = await asyncio.to_thread(_query, prometheus_port, "up")
            jobs = {r["metric"]["job"] for r in up if r["value"][1] == "1"}
            online = await asyncio.to_thread(
                _query, prometheus_port, 'sum(substrate_cells{status="online"})'
            )
            return SERVICE_JOBS | {"rabbitmq"} <= jobs and bool(online) and \
                online[0]["value"][1] == "5"  # fmt: skip

        await eventually(scraped, timeout=120, interval=2, what="Prometheus scraping the system")
        rules = await asyncio.to_thread(_query, prometheus_port, "ALERTS")
        assert not [r for r in rules if r["metric"].get("alertstate") == "firing"], rules
    finally:
        await asyncio.to_thread(stack.stop)  # `down -v`: containers, network, volume
    assert _leftovers(project) == [], "compose down left something of this project behind"
