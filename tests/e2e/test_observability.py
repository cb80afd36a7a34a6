"""Every PromQL expression of every dashboard and alert rule, run by a real Prometheus (Debian's
package) scraping a running system: the four services, cells with agents, a rollout, flags and
an infrastructure template, and RabbitMQ's own exporter."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.bus.rabbit_bus import RabbitBus
from observability import dashboards, prometheus
from testing.cells import TEMPLATE
from testing.fleet import Fleet
from testing.polling import eventually
from testing.ports import free_port, wait_port
from testing.processes import Processes, start_registry, start_rollout
from testing.services import aws_env

RULES = prometheus.RULES
# Metric names in an expression (label names and functions are not followed by "{" or " ").
_METRIC = re.compile(r"\b((?:substrate|rabbitmq)_[a-z0-9_]+|up)\b")


def query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


def rules(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as answer:
        groups = json.load(answer)["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture
async def prometheus_port(own_procs: Processes,
                          tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:  # fmt: skip
    """A Prometheus process; the test writes its scrape targets into the returned config file
    and asks it to reload."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: make test installs Debian's package"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus.config({}, rabbitmq="127.0.0.1:15692", interval="1s"))
    await own_procs.start(
        "prometheus", binary, f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    )  # fmt: skip
    await wait_port(port)
    yield port, config


@pytest.mark.e2e
async def test_every_dashboard_and_alert_expression_returns_data_from_a_running_system(
    own_procs: Processes, moto: str, tmp_path: Path, own_bus: RabbitBus,
    prometheus_port: tuple[int, Path],
) -> None:  # fmt: skip
    # Its own vhost: cells earlier tests left in the session's would join (and hold) its rollout.
    procs, services, bus = own_procs, own_procs.services, own_bus
    port, config = prometheus_port
    registry = await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="60")
    rollout = await start_rollout(procs)
    flags_port, infra_port = free_port(), free_port()
    await procs.start("flags", "substrate-flags", SUBSTRATE_METRICS_PORT=str(flags_port))
    await procs.start("infra", "substrate-infra-compliance", SUBSTRATE_METRICS_PORT=str(infra_port),
                      SUBSTRATE_TICK_SECONDS="0.2", SUBSTRATE_TEMPLATES_BUCKET="obs-templates",
                      **aws_env(moto))  # fmt: skip
    await eventually(lambda: _answers(procs), timeout=40, interval=0.5, what="services up")
    config.write_text(prometheus.config(
        {"substrate-registry": [f"127.0.0.1:{registry.metrics_port}"],
         "substrate-rollout": [f"127.0.0.1:{rollout.metrics_port}"],
         "substrate-flags": [f"127.0.0.1:{flags_port}"],
         "substrate-infra-compliance": [f"127.0.0.1:{infra_port}"]},
        rabbitmq="127.0.0.1:15692", vhost=services.vhost, interval="1s",
    ))  # fmt: skip
    await asyncio.to_thread(_reload, port)

    # A small fleet with a rollout, flags and a template deadline, so every panel has data.
    (tmp_path / "policy.yaml").write_text("soak_seconds: {staging: 0, saas: 0, dedicated: 0}\n")
    assert (await procs.ctl("rollout", "policy", "set", str(tmp_path / "policy.yaml")))[0] == 0
    fleet = Fleet(procs, moto, tmp_path, bus)
    await fleet.add("staging")
    await fleet.add("dedicated", 2)
    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed", timeout=90)
    flag = tmp_path / "flag.yaml"
    flag.write_text("key: obs-editor\nowner: team\nrules:\n  - serve: on\n")
    assert (await procs.ctl("flags", "set", str(flag)))[0] == 0
    for cell in fleet.cells:
        assert (await procs.ctl("flags", "eval", "obs-editor", "--cell", cell.id))[0] == 0
    code, _, err = await procs.ctl("infra", "publish", "3", "--template", str(TEMPLATE),
                                   "--grace", "1h")  # fmt: skip
    assert code == 0, err

    async def targets_up() -> bool:
        up = await asyncio.to_thread(query, port, "up")
        return len(up) == 6 and all(r["value"][1] == "1" for r in up)

    await eventually(targets_up, timeout=40, interval=0.5, what="every target scraped")

    missing: list[str] = []
    for expr in dashboards.expressions():
        try:
            await eventually(partial(asyncio.to_thread, query, port, expr), timeout=30,
                             interval=1, what=expr)  # fmt: skip
        except AssertionError:
            missing.append(expr)
    assert not missing, f"no data for {missing}"
    # The release annotations are queries too: each runs (with or without a release in range).
    for _, expr, _ in dashboards.ANNOTATIONS:
        await asyncio.to_thread(query, port, expr)

    # Alert rules: Prometheus evaluates each without error, and every metric each reads exists.
    alert_rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    loaded = await eventually(partial(asyncio.to_thread, _all_rules_evaluated, port),
                              timeout=30, interval=1, what="rules evaluated")  # fmt: skip
    assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules}
    assert all(r["health"] == "ok" for r in loaded), [r for r in loaded if r["health"] != "ok"]
    for rule in alert_rules:
        for name in set(_METRIC.findall(rule["expr"])):
            series = await asyncio.to_thread(query, port, f"count({name})")
            assert series, f"{rule['alert']}: no series {name}"


def _all_rules_evaluated(port: int) -> list[dict[str, Any]] | None:
    found = rules(port)
    return found if found and all(r.get("lastEvaluation", "").startswith("20") for r in found) \
        else None  # fmt: skip


def _reload(port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/-/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


async def _answers(procs: Processes) -> bool:
    code, _, _ = await procs.ctl("status")
    return code == 0
