"""The control plane on Redis with a replica and three sentinels (SUBSTRATE_REDIS_SENTINELS): the
primary is killed with -9 in the middle of a rollout, right after operators were told their
writes succeeded. Sentinel promotes the replica, every service follows it, the rollout
completes, and every acknowledged write is on the new primary: the services answered an
operator only once a replica had the write (Redis WAIT)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import redis_client
from common.bus.errors import RpcFailure
from common.bus.rabbit_bus import RabbitBus
from testing.fleet import Fleet, quick_fleet, write
from testing.ledger import CELLS, Ledger, applied, applier_env
from testing.nodes import PrivateRedis, PrivateSentinel
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services


@dataclasses.dataclass
class Replicated:
    primary: PrivateRedis
    replica: PrivateRedis
    sentinels: list[PrivateSentinel]

    @property
    def setting(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        return {"SUBSTRATE_REDIS_SENTINELS": self.setting}


@pytest.fixture(scope="module")
async def replicated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicated]:
    root = tmp_path_factory.mktemp("sentinel")
    primary = PrivateRedis(root / "primary")
    await primary.start()
    replica = PrivateRedis(root / "replica", args=("--replicaof", "127.0.0.1", str(primary.port)))
    nodes = Replicated(primary, replica, [])
    try:
        await replica.start()
        # Up is not in sync: the primary waits repl-diskless-sync-delay (5 s) for more replicas
        # before the first full copy, and until then WAIT counts no replica.
        link = redis_client.connect(replica.url)
        try:
            await eventually(
                lambda: _link_up(link), timeout=60, what="the replica in sync with the primary"
            )
        finally:
            await link.aclose()
        for i in range(3):
            sentinel = PrivateSentinel(root / f"sentinel{i}", primary)
            nodes.sentinels.append(sentinel)
            await sentinel.start()
        yield nodes
    finally:
        for sentinel in nodes.sentinels:
            await sentinel.kill()
        await replica.kill()
        await primary.kill()


async def _link_up(replica: aioredis.Redis) -> bool:
    info = await replica.info("replication")
    return info.get("master_link_status") == "up"


@pytest.fixture
async def private(machine: Services, replicated: Replicated) -> Services:
    """A vhost on the machine's broker (Redis is what this module faults); Redis is the
    replicated pair (database 0, found through the sentinels by the services)."""
    return dataclasses.replace(machine, redis_url=f"redis://127.0.0.1:{replicated.primary.port}/0")


@pytest.fixture
async def fleet(
    fprocs: Processes, moto: str, tmp_path: Path, fbus: RabbitBus, replicated: Replicated
) -> Fleet:
    env = replicated.env()
    await start_registry(fprocs, SUBSTRATE_OFFLINE_AFTER_SECONDS="20", **env)
    await fprocs.start("flags", "substrate-flags", **env)
    return await quick_fleet(fprocs, moto, tmp_path, fbus, **env)


@pytest.mark.fault
async def test_an_answer_waits_for_the_replica(replicated: Replicated) -> None:
    """The wait before an operator's answer is the replica's: with the replica stopped
    (SIGSTOP, connected but silent) it fails after its timeout; resumed, it passes."""
    redis = redis_client.connect(f"redis://127.0.0.1:{replicated.primary.port}/0")
    patient = redis_client.Durability(redis, replicas=1, timeout_ms=5000)
    try:
        await patient.wait()
        replicated.replica.pause()
        try:
            await redis.set("substrate:test:unreplicated", "1")
            with pytest.raises(RpcFailure, match="0 of 1 Redis replicas confirmed") as caught:
                await redis_client.Durability(redis, replicas=1, timeout_ms=300).wait()
            assert caught.value.code == "not_replicated"
        finally:
            replicated.replica.resume()
        await patient.wait()
    finally:
        await redis.aclose()


FLAG = """
key: {key}
owner: team-failover
description: Written just before the primary dies
rules:
  - name: everyone
    serve: on
"""


@pytest.mark.fault
async def test_redis_primary_killed_mid_rollout_sentinel_promotes_the_replica(
    fleet: Fleet, replicated: Replicated
) -> None:
    env = applier_env(0.5)
    await fleet.add("staging", 1, **env)
    await fleet.add("saas", 1, **env)
    await fleet.add("dedicated", max(CELLS - 2, 1), **env)
    version = await fleet.publish(1)
    await eventually(lambda: any(applied(c.state) for c in fleet.cells), timeout=60,
                     interval=0.05, what="a first cell applying")  # fmt: skip

    # Operators' writes, each answered "changed"; the primary dies right after the last answer.
    keys = [f"failover-{fleet.minor}-{i}" for i in range(5)]
    for key in keys:
        code, result, err = await fleet.procs.ctl(
            "flags", "set", write(fleet.root / f"{key}.yaml", FLAG.format(key=key))
        )
        assert code == 0 and result["changed"], err
    await replicated.primary.kill()

    await eventually(
        lambda: all(s.primary_port() == replicated.replica.port for s in replicated.sentinels),
        timeout=60, interval=0.2, what="the sentinels naming the replica the primary",
    )  # fmt: skip
    await fleet.wait_state(version, "completed", timeout=240)
    await fleet.wait_installed(fleet.cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in fleet.cells], version).check()
    assert all(p.process.returncode is None for p in fleet.procs.running)

    code, flags, err = await fleet.procs.ctl("flags", "list")
    assert code == 0, err
    assert set(keys) <= {f["key"] for f in flags}, "an acknowledged write was lost"
