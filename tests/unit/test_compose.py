"""compose/ checked statically (the real run is tests/e2e/test_compose.py): every process is one
of the project's console scripts, every service has the settings it cannot start without and
its own broker user from the definitions, and Redis keeps what was acknowledged."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from common import topology
from deploy import rabbitmq

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("registry", "rollout", "flags", "infra_compliance")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    return loaded


def test_compose_runs_every_control_plane_service_from_a_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    services = _compose()["services"]
    commands = {s["command"][0] for s in services.values() if isinstance(s.get("command"), list)}
    expected = {
        "substrate-registry", "substrate-rollout", "substrate-flags", "substrate-infra-compliance"
    }  # fmt: skip
    assert expected <= commands
    # Besides the console scripts: Redis, the demo job (python -m deploy.demo), the certs job
    # (bash) and the agents' shell line that reads their URL.
    assert commands - {"redis-server", "python", "sh", "bash"} <= set(scripts)
    agents = [s for s in services.values() if s.get("command", [""])[0] == "sh"]
    assert len(agents) == 5 and all("cell-agent run" in a["command"][-1] for a in agents)


def test_each_service_runs_as_its_own_broker_user_with_its_settings() -> None:
    services = _compose()["services"]
    definitions = rabbitmq.definitions()
    users = {u["name"]: u for u in definitions["users"]}  # type: ignore[attr-defined]
    seen = set()
    for name in SERVICES:
        spec = services[name]
        env = spec["environment"]
        assert env.get("SUBSTRATE_AMQP_URL") and env.get("SUBSTRATE_REDIS_URL"), name
        assert {"rabbitmq", "redis"} <= set(spec["depends_on"]), name
        url = urlsplit(env["SUBSTRATE_AMQP_URL"])
        assert url.username and url.username.startswith("svc-"), name
        assert (
            rabbitmq.password_hash(url.username, url.password or "")
            == users[url.username]["password_hash"]
        ), f"{name}: the password in compose is not the one in the definitions"
        seen.add(url.username)
    assert len(seen) == len(SERVICES), "one user per service"
    assert services["registry"]["environment"]["SUBSTRATE_RABBITMQ_API_URL"]


def test_the_definitions_file_is_what_the_code_makes_and_holds_no_cell() -> None:
    assert rabbitmq.main(["--check"]) == 0, "run `make definitions`"
    definitions = rabbitmq.definitions()
    names = [u["name"] for u in definitions["users"]]  # type: ignore[attr-defined]
    assert all(n.startswith(("svc-", "op-")) for n in names)
    queues = [q["name"] for q in definitions["queues"]]  # type: ignore[attr-defined]
    assert not any(q.startswith("cell.") for q in queues)


def test_every_deployment_caps_the_brokers_message_size_and_bounds_its_queues() -> None:
    """compose's broker, the one make dev and make test use, and the tests' own brokers all
    refuse a body past the same cap; compose's definitions hold the policies the registry
    applies elsewhere."""
    cap = topology.BROKER_MAX_MESSAGE_BYTES
    conf = (ROOT / "compose" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert f"max_message_size = {cap}" in conf
    ensure = (ROOT / "scripts" / "ensure-services.sh").read_text()
    assert f"max_message_size, {cap})" in ensure
    policies = rabbitmq.definitions()["policies"]
    assert [(p["name"], p["pattern"], p["definition"]) for p in policies] == [  # type: ignore[attr-defined]
        (p.name, p.pattern, p.definition) for p in topology.POLICIES
    ]
    ports = [port for svc in _compose()["services"].values() for port in svc.get("ports", [])]
    assert ports and all(p.startswith("${SUBSTRATE_BIND_ADDRESS:-127.0.0.1}:") for p in ports)


def test_redis_keeps_acknowledged_state_across_restarts() -> None:
    command = _compose()["services"]["redis"]["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    # Fsynced before the reply: an acknowledged write survives kill -9, not only a clean stop.
    assert command[command.index("--appendfsync") + 1] == "always"


def test_cells_reach_the_broker_over_tls_verified_against_the_demo_ca() -> None:
    services = _compose()["services"]
    conf = (ROOT / "compose" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "listeners.ssl.default = 5671" in conf
    assert services["rabbitmq"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )
    registry = services["registry"]["environment"]
    assert registry["SUBSTRATE_CELL_AMQP_URL"].startswith("amqps://rabbitmq:5671")
    assert registry["SUBSTRATE_CELL_CA_FILE"] == "/tls/ca.pem"
    agents = [s for n, s in services.items() if n.startswith("agent-")]
    assert len(agents) == 5
    assert all(a["environment"]["CELL_CA_FILE"] == "/tls/ca.pem" for a in agents)
    # The broker's key is its user's alone (uid 999 in the official image and the stand-in).
    made = " ".join(services["certs"]["command"])
    assert "chown 999:999 /tls/broker.key && chmod 600 /tls/broker.key" in made
    stand_in = (ROOT / "compose" / "images" / "rabbitmq" / "Dockerfile").read_text()
    assert "--uid 999" in stand_in
