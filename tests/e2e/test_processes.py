"""Every entry point exists, and the services run as processes that operators can reach."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from testing.polling import eventually
from testing.processes import BIN, Processes

SCRIPTS = [
    "substrate-registry", "substrate-rollout", "substrate-flags", "substrate-infra-compliance",
    "cell-agent", "substratectl",
]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help(script: str) -> None:
    done = subprocess.run(
        [str(BIN / script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


async def test_services_start_answer_status_and_stop_cleanly(
    procs: Processes, control_plane: None
) -> None:
    started = [
        await procs.start(name, f"substrate-{name.replace('_', '-')}")
        for name in ("registry", "rollout", "flags", "infra_compliance")
    ]

    async def all_up() -> list[dict[str, object]] | None:
        code, rows, _ = await procs.ctl("status", SUBSTRATE_RPC_TIMEOUT_SECONDS="2")
        return rows if code == 0 else None

    rows = await eventually(all_up, timeout=40, interval=0.5, what="every service up")
    assert {r["service"] for r in rows} == {"registry", "rollout", "flags", "infra_compliance"}
    assert all(r["up"] for r in rows)
    details = {r["service"]: r["detail"] for r in rows}
    # Each service's own counts come through the one status method.
    assert "cells" in details["registry"] and "releases" in details["rollout"]
    assert "snapshot_version" in details["flags"]
    # The broker's socket limit, read by the registry through the management API.
    limit = details["registry"]["broker_socket_limit"]
    assert isinstance(limit, int) and limit > 0, details["registry"]

    codes = await asyncio.gather(*(procs.stop(p) for p in started))
    assert codes == [0, 0, 0, 0], [p.output() for p in started]
    assert all("stopped" in p.output() for p in started)


async def test_cli_reports_a_service_that_does_not_answer(
    procs: Processes, control_plane: None
) -> None:
    code, rows, _ = await procs.ctl("status", SUBSTRATE_RPC_TIMEOUT_SECONDS="0.5")
    assert code == 1
    down = [r for r in rows if not r["up"]]
    assert down and all("did not answer" in r["detail"] for r in down)


async def test_cli_without_broker_url_fails_with_one_line(procs: Processes) -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "substratectl"), "status",
        env={k: v for k, v in procs.env().items() if k != "SUBSTRATE_AMQP_URL"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 2
    assert err.decode().strip() == "error: setting SUBSTRATE_AMQP_URL is not set"


def test_cli_output_into_a_closed_pipe_ends_quietly() -> None:
    """`substratectl ... | head`: no BrokenPipe trace, the shell's own exit code (141)."""
    reader, writer = os.pipe()
    process = subprocess.Popen(
        [str(BIN / "substratectl"), "--json", "schema"], stdout=writer, stderr=subprocess.PIPE
    )
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        assert pipe.read(10)  # the reader takes a little of the 160 KB, then goes away
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141, err
    assert err == b"", err.decode()
