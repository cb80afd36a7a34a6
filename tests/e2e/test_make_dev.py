"""`make dev` as a user runs it, with two replicas of every service (SUBSTRATE_REPLICAS=2): the
script starts the system with its demo fleet of five cells, a published demo release goes
through staging, saas and dedicated's canary and waves, Prometheus
answers, and Ctrl-C leaves no process behind; after make clean, make dev with one replica (the
default) brings the cells back. Run on a vhost, Redis database and ports of its own, so the
cells earlier tests left do not join its rollout and it touches nothing else."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from common.requests.registry import CellsList
from common.requests.rollout import RolloutShow
from testing.polling import eventually
from testing.ports import free_port, free_ports
from testing.processes import BIN, Processes, running_processes
from testing.services import Services

ROOT = Path(__file__).resolve().parents[2]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def _tails(dev: Path, lines: int = 15) -> str:
    """The last lines of each service's log, for a failure's message."""
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        for log in sorted(dev.glob("*.log"))
        if not log.name.startswith(("moto", "prometheus"))
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
async def looking(fresh_services: Services, tmp_path: Path) -> AsyncIterator[Processes]:
    """The test's own asks (``Processes.ask``) on make dev's vhost; make dev starts every
    process itself, so none is started through this."""
    async with running_processes(fresh_services, tmp_path) as procs:
        yield procs


@pytest.mark.e2e
async def test_make_dev_shows_every_stage_and_stops_clean(
    fresh_services: Services, tmp_path: Path, looking: Processes
) -> None:
    services = fresh_services  # dev.sh declares the topology itself, as on a fresh broker
    dev = tmp_path / "dev"
    prefix = f"d{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "SUBSTRATE_AMQP_URL": services.amqp_url, "SUBSTRATE_REDIS_URL": services.redis_url,
        "SUBSTRATE_RABBITMQ_API_URL": services.api_url, "DEV_DIR": str(dev),
        "DEV_METRICS_BASE": str(free_ports(15)), "DEV_AGENT_BASE": str(free_ports(5)),
        "MOTO_PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port()),
        "DEV_CELL_PREFIX": prefix, "SUBSTRATE_REPLICAS": "2",
        # The flow is under test, not the speed: services just started on a loaded machine
        # may take more than the operator's default 5 s to answer.
        "SUBSTRATE_RPC_TIMEOUT_SECONDS": "30",
    }  # fmt: skip
    log = tmp_path / "make-dev.log"
    script = await _dev(env, log)
    try:
        await eventually(lambda: "Ctrl-C stops everything" in log.read_text(), timeout=180,
                         interval=0.5, what="make dev ready")  # fmt: skip
        started = [int(p) for p in re.findall(r"\(pid (\d+)\)", log.read_text())]
        # moto, two replicas of four services, prometheus, agents
        assert len(started) == 1 + 2 * 4 + 1 + 5, log.read_text()

        async def ctl(*args: str) -> Any:
            process = await asyncio.create_subprocess_exec(
                str(BIN / "substratectl"), "--json", *args, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await process.communicate()
            assert process.returncode == 0, f"{err.decode()}\n{_tails(dev)}"
            return json.loads(out)

        # The polls look from this process (``looking``, as guest); substratectl, which is what
        # the test is about, is asked once each poll is satisfied. A substratectl each time
        # round (a second of CPU) slowed the very processes being waited for.
        async def five_online() -> bool:
            cells = await looking.ask(CellsList(status="online"))
            return len([c for c in cells if c.id.startswith(prefix)]) == 5

        await eventually(five_online, timeout=60, interval=0.5, what="five demo cells online")
        online = await ctl("cells", "list", "--status", "online")
        assert len([c for c in online if c["id"].startswith(prefix)]) == 5
        await _the_demo_release_reaches_every_cell(looking, ctl, dev, prefix)

        url = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}/api/v1/query?query=up"
        up = (await asyncio.to_thread(_get_json, url))["data"]["result"]
        assert {r["metric"]["job"] for r in up} >= {"substrate-registry", "substrate-rollout",
                                                     "cell-agent", "rabbitmq"}  # fmt: skip
        for job in ("substrate-registry", "substrate-rollout", "substrate-flags"):
            assert len([r for r in up if r["metric"]["job"] == job]) == 2, up
    finally:
        # Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
        if script.returncode is None:
            os.killpg(script.pid, signal.SIGINT)
        try:
            await asyncio.wait_for(script.wait(), 60)
        finally:
            left = [pid for pid in re.findall(r"\(pid (\d+)\)", log.read_text())
                    if _alive(int(pid))]  # fmt: skip
            for pid in left:
                os.kill(int(pid), signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    assert script.returncode == 0, "Ctrl-C is a clean stop"

    # Again with one replica of each service, make dev's default.
    await _after_make_clean({**env, "SUBSTRATE_REPLICAS": "1"}, dev, tmp_path, five_online)


async def _the_demo_release_reaches_every_cell(
    looking: Processes, ctl: Callable[..., Awaitable[Any]], dev: Path, prefix: str
) -> None:
    """Published, it goes through staging, saas, and dedicated's canary and two waves, and each
    of the five cells reports it installed."""
    release = await ctl("release", "publish", str(dev / "demo-release.yaml"))
    seen: list[tuple[str, str, int | None]] = []

    async def completed() -> bool:
        r = await looking.ask(RolloutShow(version=release["version"]))
        if not seen or seen[-1] != (r.state, r.stage, r.wave):
            seen.append((r.state, r.stage, r.wave))
        return r.state == "completed"

    await eventually(completed, timeout=180, interval=0.3, what="the demo release completed")
    assert (await ctl("rollout", "status", release["version"]))["state"] == "completed"
    stages = [s for _, s, _ in seen]
    assert stages == sorted(stages, key=["staging", "saas", "dedicated"].index)
    assert ("soaking", "staging", 1) in seen and ("soaking", "saas", 1) in seen
    dedicated_waves = {w for _, s, w in seen if s == "dedicated"}
    assert dedicated_waves == {1, 2, 3}, f"the canary and two waves: {seen}"

    async def all_on_it() -> bool:
        # The registry shows it from each agent's next heartbeat (every 5 s in make dev).
        cells = await looking.ask(CellsList())
        mine = [c.installed_release for c in cells if c.id.startswith(prefix)]
        return mine == [release["version"]] * 5

    await eventually(all_on_it, timeout=30, interval=0.5, what="the release on all five")
    listed = await ctl("cells", "list")
    mine = [c["installed_release"] for c in listed if c["id"].startswith(prefix)]
    assert mine == [release["version"]] * 5


async def _after_make_clean(
    env: dict[str, str], dev: Path, tmp_path: Path, five_online: Callable[[], Awaitable[bool]]
) -> None:
    # make clean: the demo cells' URLs are gone with the directory; make dev gives them new
    # credentials and all five come online again.
    shutil.rmtree(dev)
    log = tmp_path / "make-dev-again.log"
    script = await _dev(env, log)
    try:
        await eventually(lambda: "Ctrl-C stops everything" in log.read_text(), timeout=180,
                         interval=0.5, what="make dev ready again")  # fmt: skip
        # moto, one replica of four services, prometheus, agents
        assert len(re.findall(r"\(pid (\d+)\)", log.read_text())) == 1 + 4 + 1 + 5
        await eventually(five_online, timeout=60, interval=0.5, what="five online after clean")
        # A process that dies fails make dev, named, with the end of its log.
        agent = re.search(r"cell-agent (\S+) \(\w+\) \(pid (\d+)\)", log.read_text())
        assert agent, log.read_text()
        os.kill(int(agent[2]), signal.SIGKILL)
        assert await asyncio.wait_for(script.wait(), 60) == 1
        said = log.read_text()
        assert f"error: cell-agent {agent[1]}" in said and f"(pid {agent[2]}) exited" in said
    finally:
        if script.returncode is None:
            os.killpg(script.pid, signal.SIGKILL)
        for pid in re.findall(r"\(pid (\d+)\)", log.read_text()):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


async def _dev(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            "bash", "scripts/dev.sh", cwd=ROOT, env=env, stdout=sink,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


@pytest.mark.e2e
async def test_make_dev_with_a_busy_port_names_it_and_starts_nothing(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    env = {
        **os.environ, "DEV_DIR": str(dev), "DEV_METRICS_BASE": str(free_ports(15)),
        "DEV_AGENT_BASE": str(free_ports(5)), "MOTO_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
    }  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["PROMETHEUS_PORT"])))
        taken.listen()
        log = tmp_path / "make-dev.log"
        script = await _dev(env, log)
        code = await asyncio.wait_for(script.wait(), 60)
    said = log.read_text()
    assert code == 1, said
    assert f"error: port {env['PROMETHEUS_PORT']} (PROMETHEUS_PORT) is in use" in said, said
    assert "(pid " not in said and not dev.exists(), "nothing was started"
