"""Cells talk to the broker over TLS: a private node with an AMQPS listener and certificates from
scripts/certs.sh. An agent given the right CA connects over amqps:// and registers; one given
another CA, or pointed at the plain listener, never connects and says why in its log."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from testing.cells import create_cell, new_cell_id, show, start_agent, status_is
from testing.fleet import Fleet
from testing.nodes import PrivateRabbit, running
from testing.polling import eventually
from testing.processes import Proc

ROOT = Path(__file__).resolve().parents[2]


def _certs(directory: Path) -> Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "certs.sh"), str(directory)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
async def rabbit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateRabbit]:
    """This module's private node also listens for AMQPS."""
    tls = _certs(tmp_path_factory.mktemp("tls"))
    async with running(PrivateRabbit(tmp_path_factory.mktemp("rabbit"), tls=tls)) as node:
        yield node


def _with(url: str, scheme: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(scheme=scheme, netloc=netloc))


@pytest.mark.fault
async def test_agents_verify_the_broker_and_refuse_one_that_does_not_verify(
    fleet: Fleet, rabbit: PrivateRabbit, moto: str, tmp_path: Path
) -> None:
    procs = fleet.procs
    assert rabbit.tls is not None
    ca = rabbit.tls / "ca.pem"
    wrong_ca = _certs(tmp_path / "other") / "ca.pem"

    async def cell_with(ca_file: Path, *, port: int) -> tuple[str, Proc]:
        cell = new_cell_id()
        created = await create_cell(procs, cell)
        url = _with(created["amqp_url"], "amqps", port)
        agent = await start_agent(
            procs, moto, cell, url, tmp_path / cell, CELL_CA_FILE=str(ca_file)
        )
        return cell, agent

    good, _ = await cell_with(ca, port=rabbit.amqps_port)
    await eventually(lambda: status_is(procs, good, "online"), timeout=60, interval=0.3,
                     what="the agent online over AMQPS")  # fmt: skip

    async def over_tls() -> bool:
        # The management API lists a connection once its statistics are first emitted.
        connections = await procs.services.api.connections(user=good)
        return bool(connections) and all(c.get("ssl") for c in connections)

    await eventually(over_tls, timeout=30, interval=0.5, what="the cell's connection over TLS")

    wrong, wrong_agent = await cell_with(wrong_ca, port=rabbit.amqps_port)
    plain, plain_agent = await cell_with(ca, port=rabbit.amqp_port)
    for agent, says in ((wrong_agent, "certificate verify failed"), (plain_agent, "[SSL:")):

        def said(a: Proc = agent, w: str = says) -> bool:
            return w in a.output()

        await eventually(said, timeout=60, interval=0.3, what=f"the agent saying {says!r}")
        assert agent.process.returncode is None, "it keeps trying, it does not give up"
    for cell in (wrong, plain):
        assert (await show(procs, cell))["status"] == "created", "never registered"
        assert await procs.services.api.connections(user=cell) == []

    # A CA for a plain URL is a mistake the agent refuses at start, naming the setting.
    bad = await procs.start("agent-bad", "cell-agent", "run", CELL_ID=new_cell_id(),
                            CELL_AMQP_URL=rabbit.amqp_url, CELL_STATE_DIR=str(tmp_path / "b"),
                            CELL_CA_FILE=str(ca))  # fmt: skip
    assert await bad.process.wait() == 2
    assert "CELL_CA_FILE" in bad.output()
