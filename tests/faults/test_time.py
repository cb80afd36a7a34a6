"""Time (RELIABILITY.md 12 and 13): clocks that disagree, and a cell away for days. Whole
processes read their wall clock's skew from a file (SUBSTRATE_CLOCK_SKEW_FILE), so a test makes
clocks disagree, or makes days pass, without waiting for them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from common.bus.rabbit_bus import RabbitBus
from testing.cells import show, status_is
from testing.fleet import Fleet, quick_fleet
from testing.ledger import Ledger, applier_env
from testing.nodes import PrivateRabbit
from testing.polling import eventually
from testing.processes import Processes, Registry, start_registry
from testing.proxy import Proxy

DAY = 86_400


def _skew(path: Path, seconds: float) -> dict[str, str]:
    path.write_text(str(seconds))
    return {"SUBSTRATE_CLOCK_SKEW_FILE": str(path)}


async def _fleet(
    procs: Processes, moto: str, root: Path, bus: RabbitBus,
    registry: dict[str, str], rollout: dict[str, str],
) -> tuple[Fleet, Registry]:  # fmt: skip
    started = await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="20", **registry)
    return await quick_fleet(procs, moto, root, bus, **rollout), started


@pytest.mark.fault
@pytest.mark.chaos
async def test_clocks_that_disagree(
    fprocs: Processes, moto: str, tmp_path: Path, fbus: RabbitBus
) -> None:
    """12. One cell's clock is a day ahead, another's a day behind, and the rollout service's
    an hour ahead of the registry's: liveness goes by the registry's clock (no cell ever marked
    offline, no flapping), and the release goes out and is applied once."""
    fleet, registry = await _fleet(fprocs, moto, tmp_path, fbus, {},
                                   _skew(tmp_path / "rollout.skew", 3600))  # fmt: skip
    ahead = await fleet.add("staging", 1, **applier_env(), **_skew(tmp_path / "a.skew", DAY))
    behind = await fleet.add("dedicated", 1, **applier_env(), **_skew(tmp_path / "b.skew", -DAY))
    cells = ahead + behind
    version = await fleet.publish(1)
    await fleet.wait_state(version, "completed", timeout=120)
    await fleet.wait_installed(cells, version, timeout=60)
    Ledger.of([(c.id, c.state) for c in cells], version).check()
    now = datetime.now(UTC)
    for cell in cells:
        seen = datetime.fromisoformat((await show(fprocs, cell.id))["last_heartbeat_at"])
        assert abs(seen - now) < timedelta(minutes=5), (cell.id, seen, "the cell's clock")
    assert await registry.metric("substrate_cell_liveness_transitions_total", to="offline") == 0


@pytest.fixture
async def proxy(rabbit: PrivateRabbit) -> AsyncIterator[Proxy]:
    link = Proxy(rabbit.amqp_port)
    await link.start()
    yield link
    await link.close()


@pytest.mark.fault
@pytest.mark.chaos
async def test_a_cell_away_for_days(
    fprocs: Processes, moto: str, tmp_path: Path, fbus: RabbitBus, proxy: Proxy
) -> None:
    """13. A cell's link to the broker is cut (its agent keeps running, reconnecting in vain)
    and three days pass for everyone: it is marked offline, not deleted; a release goes out
    without it; when the link returns, it reconnects with the credentials it has, syncs and
    catches up, applying the release once."""
    clock = _skew(tmp_path / "clock.skew", 0)
    fleet, _ = await _fleet(fprocs, moto, tmp_path, fbus, clock, clock)
    # A stage whose every cell is offline halts a rollout: another dedicated cell stays.
    staying = await fleet.add("staging", 1, **applier_env(), **clock)
    staying += await fleet.add("dedicated", 1, **applier_env(), **clock)
    (away,) = await fleet.add("dedicated", 1, **applier_env(), **clock)
    await fleet.stop_agent(away)
    away.url = proxy.url(away.url)
    await fleet.start_agent(away)
    await eventually(lambda: proxy.accepted > 0, timeout=30, interval=0.2, what="via the proxy")
    await eventually(lambda: status_is(fprocs, away.id, "online"), timeout=30, interval=0.3)
    before = await show(fprocs, away.id)

    proxy.refuse = True
    proxy.cut()
    _skew(tmp_path / "clock.skew", 3 * DAY)
    offline = await eventually(lambda: status_is(fprocs, away.id, "offline"), timeout=60,
                               interval=0.3, what="the away cell offline")  # fmt: skip
    kept = ("stage", "region", "org", "aws_account_id", "installed_release", "registered_at")
    assert {k: offline[k] for k in kept} == {k: before[k] for k in kept}
    # Everyone's clock jumped: the others are online again with their next heartbeat.
    for cell in staying:
        await eventually(partial(status_is, fprocs, cell.id, "online"), timeout=30, interval=0.3)

    version = await fleet.publish(1)
    done = await fleet.wait_state(version, "completed", timeout=120)
    assert done["stages"]["dedicated"]["offline"] == 1, done
    assert (await fleet.explain(away))["reason"] == "offline"

    proxy.heal()
    # The agent's reconnect backoff is at most 30 s.
    await fleet.wait_installed([away], version, timeout=120)
    await eventually(lambda: status_is(fprocs, away.id, "online"), timeout=30, interval=0.3)
    assert (await fleet.explain(away))["reason"] == "up_to_date"
    Ledger.of([(c.id, c.state) for c in [*staying, away]], version).check()
