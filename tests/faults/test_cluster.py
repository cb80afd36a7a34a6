"""The control plane on a three-node RabbitMQ cluster (tests/faults/nodes.py PrivateCluster):
every process, cells included, is given all three nodes' URLs; the service queues and (with
``SUBSTRATE_CELL_QUEUES=quorum``) the cells' command queues are quorum queues replicated on every
node. The node leading the service queues is killed with -9 in the middle of a rollout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from common import topology
from common.bus import RabbitBus
from common.messages import command_queue
from tests.conftest import Services, isolated_services
from tests.e2e.conftest import Processes, start_registry
from tests.e2e.test_rollout import Fleet, quick_fleet
from tests.faults.conftest import running
from tests.faults.ledger import CELLS, Ledger, applied, applier_env
from tests.faults.nodes import PrivateCluster, PrivateRedis
from tests.helpers import eventually

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
        bus = await RabbitBus.connect(
            f"{first.amqp_url.rstrip('/')}/{quote(own.vhost, safe='')}", name="cluster-topology"
        )
        await bus.declare(topology.control_plane())
        await bus.close()
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
