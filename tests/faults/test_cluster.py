"""The control plane on a three-node RabbitMQ cluster (testing/nodes.py PrivateCluster):
every process, cells included, is given all three nodes' URLs; the service queues and (with
``SUBSTRATE_CELL_QUEUES=quorum``) the cells' command queues are quorum queues replicated on every
node. The node leading the service queues is killed with -9 in the middle of a rollout."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from common.bus.rabbit_bus import RabbitBus
from common.messages import command_queue
from testing.fleet import Fleet, quick_fleet
from testing.ledger import CELLS, Ledger, applied, applier_env
from testing.nodes import PrivateCluster, PrivateRedis, running
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services, declare_control_plane, isolated_services
from testing.simulator import Simulators, gather_limited

SERVICE_QUEUES = ("registry.cells", "rollout.cells", "rollout.events", "flags.cells")


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateCluster]:
    async with running(PrivateCluster(tmp_path_factory.mktemp("cluster"))) as nodes:
        yield nodes


@pytest.fixture
async def private(cluster: PrivateCluster, redis_node: PrivateRedis) -> AsyncIterator[Services]:
    """A vhost on the cluster, its topology declared through the first node (a quorum queue's
    leader starts on the node that declared it), so the test knows which node to kill; the
    management API of the second node."""
    for node in cluster.nodes:
        if not node.child.running:
            await node.start()
    first, second = cluster.nodes[0], cluster.nodes[1]
    urls = (cluster.amqp_url, second.api_url, redis_node.url)
    async with isolated_services(urls, "cluster") as own:
        first_url = f"{first.amqp_url.rstrip('/')}/{quote(own.vhost, safe='')}"
        await declare_control_plane(first_url, "cluster-topology")
        yield own
        # Deleting the vhost's quorum queues waits for every member: the killed node comes back
        # first (as an operator would bring it back).
        for node in cluster.nodes:
            if not node.child.running:
                await node.start()


@pytest.fixture
async def fleet(fprocs: Processes, moto: str, tmp_path: Path, fbus: RabbitBus) -> Fleet:
    await start_registry(
        fprocs, SUBSTRATE_OFFLINE_AFTER_SECONDS="20", SUBSTRATE_CELL_QUEUES="quorum"
    )
    return await quick_fleet(fprocs, moto, tmp_path, fbus)


async def _leaders(private: Services, names: tuple[str, ...]) -> dict[str, str]:
    vhost = quote(private.vhost, safe="")
    found = {}
    for name in names:
        queue = await private.api.call("GET", f"/queues/{vhost}/{quote(name, safe='')}")
        assert queue["type"] == "quorum", queue
        found[name] = queue["leader"]
    return found


async def _queues(private: Services) -> list[tuple[object, ...]]:
    """Each queue's leader, messages (ready, unacked) and consumers: what a failure shows."""
    queues = await private.api.call("GET", f"/queues/{quote(private.vhost, safe='')}")
    keys = ("name", "leader", "messages_ready", "messages_unacknowledged", "consumers")
    return [tuple(q.get(k) for k in keys) for q in queues]


@pytest.mark.fault
async def test_node_leading_the_service_queues_killed_mid_rollout(
    fleet: Fleet, cluster: PrivateCluster, private: Services
) -> None:
    """kill -9 of the node every service queue is led from while cells are applying: the queues
    elect leaders on the other two nodes, every process (agents too) reconnects to a surviving
    node, and the rollout completes without the dead node; each cell applied the release once."""
    env = {**applier_env(0.5), "CELL_LOG_LEVEL": "DEBUG"}
    await fleet.add("staging", 1, **env)
    await fleet.add("saas", 1, **env)
    await fleet.add("dedicated", max(CELLS - 2, 1), **env)
    victim = cluster.nodes[0]
    leaders = await _leaders(private, SERVICE_QUEUES)
    assert set(leaders.values()) == {victim.node}, leaders
    cell_queue = command_queue(fleet.cells[0].id)
    assert (await _leaders(private, (cell_queue,)))[cell_queue]

    version = await fleet.publish(1)
    await eventually(lambda: any(applied(c.state) for c in fleet.cells), timeout=60,
                     interval=0.05, what="a first cell applying")  # fmt: skip
    await victim.kill()

    try:
        await fleet.wait_state(version, "completed", timeout=240)
        await fleet.wait_installed(fleet.cells, version, timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; queues: {await _queues(private)}") from None
    Ledger.of([(c.id, c.state) for c in fleet.cells], version).check()
    assert all(p.process.returncode is None for p in fleet.procs.running)
    after = await _leaders(private, SERVICE_QUEUES)
    assert victim.node not in after.values(), after
    assert not victim.child.running, "the rollout completed without the killed node"


# The fleet for the cluster failover: simulated cells (testing/simulator.py, one process
# of their own), each with its own broker user, connection and quorum command queue.
SIMULATED = int(os.environ.get("SUBSTRATE_FAULT_SIMULATED_CELLS", "200"))


@pytest.mark.fault
@pytest.mark.chaos
async def test_node_leading_the_service_queues_killed_while_200_cells_take_a_rollout(
    fleet: Fleet, cluster: PrivateCluster, private: Services, fbus: RabbitBus, tmp_path: Path
) -> None:
    """The same kill with 200 simulated cells (an instant applier each) spread over the waves:
    the rollout completes, every cell applied the release, and none applied it twice (a second
    generation of the same release would be a second application)."""

    async def create(i: int) -> tuple[str, str]:
        cell_id = f"sim-{i:03d}"
        record = await fbus.request("registry", "cells.create", {
            "id": cell_id, "stage": "dedicated", "region": "eu-west-1", "org": "sim",
        }, timeout=60)  # fmt: skip
        return cell_id, str(record["amqp_url"])

    cells = await gather_limited(SIMULATED, 8, create)
    victim = cluster.nodes[0]
    assert set((await _leaders(private, SERVICE_QUEUES)).values()) == {victim.node}
    sims = await Simulators.start(cells, 1, tmp_path)
    try:
        await sims.command("connect", "connected")
        await sims.command("answer", "answering")
        await sims.command("register", "registered")
        await sims.command("beat", "beating")

        async def all_online() -> bool:
            status = await fbus.request("registry", "status", timeout=30)
            return bool(status["cells"].get("online", 0) == SIMULATED)

        await eventually(all_online, timeout=60, interval=0.5, what="every cell online")
        version = await fleet.publish(1)

        async def a_wave_done() -> bool:
            return bool((await fleet.status(version))["stages"]["dedicated"]["updated"] >= 1)

        await eventually(a_wave_done, timeout=60, interval=0.1, what="the canary updated")
        await victim.kill()
        try:
            await fleet.wait_state(version, "completed", timeout=240)
            await asyncio.wait_for(sims.all_updated(version), 60)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc!r}; queues: {await _queues(private)}") from None
        ledger = await sims.ledger()
    finally:
        await sims.stop()
    lost = [c for c, _ in cells if not ledger.get(c, {}).get(version)]
    twice = {c: g[version] for c, g in ledger.items() if len(g.get(version, [])) > 1}
    assert (lost, twice) == ([], {}), f"lost: {lost}; applied twice: {twice}"
    assert (await fleet.status(version))["stages"]["dedicated"]["updated"] == SIMULATED
    assert not victim.child.running, "the rollout completed without the killed node"
