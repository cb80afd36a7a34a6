"""An upgrade that takes longer than the broker's consumer_timeout (RELIABILITY.md 8): the
agent journals the desired state and acks it before the long work, so the broker never closes
its channel and never redelivers it; the release is applied once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest

from testing.fleet import POLICY, Fleet
from testing.ledger import Ledger, applier_env
from testing.nodes import PrivateRabbit, running

TIMEOUT_MS = 3_000
# The broker looks for timed-out consumers once a minute: an upgrade this long spans a look.
APPLY_SECONDS = 65


@pytest.fixture(scope="module")
async def rabbit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateRabbit]:
    """This module's node closes a channel that holds a delivery unacked for 3 s."""
    node = PrivateRabbit(tmp_path_factory.mktemp("rabbit"),
                         config=f"consumer_timeout = {TIMEOUT_MS}\n")  # fmt: skip
    async with running(node) as started:
        yield started


async def _held_past_the_timeout_is_closed(url: str) -> None:
    """The timeout is in force here: a consumer holding a delivery is cut off."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"held"), queue.name)
        closed: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        def on_close(_channel: object, exc: object) -> None:
            if not closed.done():
                closed.set_result(exc)

        async def hold(_message: object) -> None:
            return None  # never acked

        channel.close_callbacks.add(on_close)
        await queue.consume(hold)
        reason = await asyncio.wait_for(closed, timeout=120)
        assert "PRECONDITION_FAILED" in str(reason) or "timeout" in str(reason).lower(), reason
    finally:
        await connection.close()


@pytest.mark.fault
@pytest.mark.chaos
async def test_an_upgrade_longer_than_the_consumer_timeout(fleet: Fleet) -> None:
    # The check that the timeout is in force (it takes up to a minute) runs beside the rollout.
    control = asyncio.create_task(_held_past_the_timeout_is_closed(fleet.procs.services.amqp_url))
    await fleet.tap()
    policy = fleet.root / "slow-policy.yaml"
    # Longer than the upgrade, or the rollout would halt on a cell that looks stuck.
    policy.write_text(POLICY.replace("deadline_seconds: 60", "deadline_seconds: 600"))
    code, _, err = await fleet.procs.ctl("rollout", "policy", "set", str(policy))
    assert code == 0, err
    cells = await fleet.add("staging", 1, **applier_env(APPLY_SECONDS))
    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed", timeout=180)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()
    reports = await fleet.upgrades()
    for cell in cells:
        mine = [r.phase for r in reports if r.cell_id == cell.id]
        # Applied once: the one phase that lasts (and so is reported) is reported once.
        assert mine.count("applying") == 1 and mine[-1] == "succeeded", (cell.id, mine)
        log = cell.agent.output()
        assert "PRECONDITION_FAILED" not in log and "consumer ack timed out" not in log, log[-3000:]
    await control
