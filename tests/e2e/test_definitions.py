"""compose's broker definitions, loaded into a fresh vhost of the real broker: the services run
as their own least-privileged users without declaring anything, a cell registers and a release
rolls; declaring the control plane's topology over the definitions changes nothing (no argument
differs from what the services declare)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from common import topology
from common.bus.rabbit_bus import RabbitBus
from deploy import rabbitmq
from testing.cells import new_cell_id, start_agent
from testing.fleet import HOST, push_image
from testing.polling import eventually
from testing.processes import Processes
from testing.services import Services, aws_env
from testing.versions import fresh_version


def _url(base: str, user: str, vhost: str) -> str:
    parts = urlsplit(base)
    netloc = f"{user}:{rabbitmq.PASSWORDS[user]}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))


def _api(base: str, user: str) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, f"{user}:{rabbitmq.PASSWORDS[user]}@{parts.hostname}:"
                       f"{parts.port}", "", "", ""))  # fmt: skip


@pytest.fixture
async def loaded(fresh_services: Services) -> Services:
    """A vhost and Redis database of the test's own, with the definitions loaded into the vhost
    (the users they create are granted there, so they go with it)."""
    definitions = rabbitmq.definitions(fresh_services.vhost)
    await fresh_services.api.call("POST", "/definitions", definitions)
    return fresh_services


@pytest.mark.e2e
async def test_the_services_run_on_the_definitions_as_their_own_users(
    procs: Processes, services: Services, loaded: Services, moto: str, tmp_path: Path
) -> None:
    vhost = loaded.vhost
    base = urlsplit(services.amqp_url)._replace(path="/").geturl()
    users = {"registry": "svc-registry", "rollout": "svc-rollout", "flags": "svc-flags",
             "infra-compliance": "svc-infra"}  # fmt: skip
    for service, user in users.items():
        env = {"SUBSTRATE_AMQP_URL": _url(base, user, vhost), "SUBSTRATE_DECLARE_TOPOLOGY": "false",
               "SUBSTRATE_REDIS_URL": loaded.redis_url, "SUBSTRATE_METRICS_PORT": "0",
               "SUBSTRATE_TICK_SECONDS": "0.2",
               **aws_env(moto)}  # fmt: skip
        if service == "registry":
            env["SUBSTRATE_RABBITMQ_API_URL"] = _api(services.api_url, user)
        await procs.start(f"{service}-defs", f"substrate-{service}", **env)
    operator = {"SUBSTRATE_AMQP_URL": _url(base, "op-admin", vhost)}

    async def all_up() -> bool:
        code, _, _ = await procs.ctl("status", **operator)
        return code == 0

    await eventually(all_up, timeout=40, interval=0.5, what="every service up on its own user")

    # A cell registers with the credentials the registry made for it.
    cell = new_cell_id()
    code, created, err = await procs.ctl(
        "cells",
        "create",
        cell,
        "--stage",
        "staging",
        "--region",
        "eu-west-1",
        "--org",
        "acme",
        **operator,
    )
    assert code == 0, err
    await start_agent(procs, moto, cell, created["amqp_url"], tmp_path / cell)
    await eventually(lambda: _online(procs, cell, operator), timeout=30, interval=0.3)

    # A release rolls to it.
    (tmp_path / "policy.yaml").write_text("soak_seconds: {staging: 0, saas: 0, dedicated: 0}\n")
    code, _, err = await procs.ctl("rollout", "policy", "set", str(tmp_path / "policy.yaml"),
                                   **operator)  # fmt: skip
    assert code == 0, err
    version = fresh_version()
    digest = push_image(moto, "substrate/server", version)
    release = tmp_path / "release.yaml"
    release.write_text(f"version: {version}\ncomponents:\n  - name: server\n"
                       f"    image: {HOST}/substrate/server\n    digest: {digest}\n")  # fmt: skip
    code, _, err = await procs.ctl("release", "publish", str(release), **operator)
    assert code == 0, err

    async def rolled() -> bool:
        code, shown, _ = await procs.ctl("cells", "show", cell, **operator)
        return code == 0 and shown["installed_release"] == version

    await eventually(rolled, timeout=60, interval=0.3, what="the release on the cell")

    # The services' own declarations, made over the definitions, conflict with nothing.
    bus = await RabbitBus.connect(_url(base, "op-admin", vhost), name="test-declare")
    try:
        await bus.declare(topology.control_plane())
        await bus.declare(topology.cell_commands(cell))
    finally:
        await bus.close()


async def _online(procs: Processes, cell: str, env: dict[str, str]) -> bool:
    code, shown, _ = await procs.ctl("cells", "show", cell, **env)
    return code == 0 and shown["status"] == "online"
