"""Dashboards and alert rules as code: the dashboard files are what the code makes, and
Prometheus's own tool accepts the configuration and the rules and passes the rules' tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from observability import dashboards, prometheus

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "compose" / "prometheus"


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: make test installs Debian's prometheus package"
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_dashboard_files_are_what_the_code_makes() -> None:
    assert dashboards.main(["--check"]) == 0, "run `make dashboards`"
    files = sorted(p.name for p in dashboards.OUT.glob("*.json"))
    assert files == sorted(f"{b.uid}.json" for b in dashboards.BOARDS)


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    checked = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert f"SUCCESS: {len(rules)} rules found" in checked
    assert "SUCCESS" in promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))


def test_every_alert_is_tested_firing_and_not_and_has_a_runbook_section() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    evals = [e for test in tests for e in test["alert_rule_test"]]
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbooks.splitlines()
        if line.startswith("## ")
    }
    for rule in rules:
        name = rule["alert"]
        mine = [e for e in evals if e["alertname"] == name]
        assert any(e["exp_alerts"] for e in mine), f"{name} is never tested firing"
        assert any(not e["exp_alerts"] for e in mine), f"{name} is never tested not firing"
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "docs/runbooks.md" and anchor == name.lower() in anchors, name


def test_the_prometheus_configurations_are_valid(tmp_path: Path) -> None:
    # compose's file names the rules where its container mounts them.
    compose = (PROMETHEUS / "prometheus.yml").read_text()
    (tmp_path / "compose.yml").write_text(
        compose.replace("/etc/prometheus/alerts.yml", str(PROMETHEUS / "alerts.yml"))
    )
    promtool("check", "config", str(tmp_path / "compose.yml"))
    generated = prometheus.config({"substrate-registry": ["127.0.0.1:9101"]},
                                  rabbitmq="127.0.0.1:15692", vhost="/")  # fmt: skip
    (tmp_path / "generated.yml").write_text(generated)
    promtool("check", "config", str(tmp_path / "generated.yml"))
