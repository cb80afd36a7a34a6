"""compose/ checked statically (no Docker engine here): every process it runs is one of the
project's console scripts, and every service gets the settings it cannot start without."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


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
    assert commands - {"redis-server"} <= set(scripts)


def test_every_service_has_its_required_settings_and_waits_for_its_dependencies() -> None:
    services = _compose()["services"]
    for name, spec in services.items():
        if not str(spec.get("command", [""])[0]).startswith("substrate-"):
            continue
        env = spec["environment"]
        for var in ("SUBSTRATE_AMQP_URL", "SUBSTRATE_REDIS_URL", "SUBSTRATE_RABBITMQ_API_URL"):
            assert env.get(var), f"{name} lacks {var}"
        assert set(spec["depends_on"]) == {"rabbitmq", "redis"}, name


def test_redis_keeps_acknowledged_state_across_restarts() -> None:
    command = _compose()["services"]["redis"]["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
