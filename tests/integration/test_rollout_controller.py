"""The rollout controller against real Redis: a step is written whole, a second controller
(a restart, or a replica) repeats nothing, only the lease holder writes, and a holder whose
lease was taken over is refused by Redis itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from common import topology
from common.bus.rabbit_bus import RabbitBus
from common.clock import FakeClock
from common.lease import Lease
from common.messages import CellRegistered, CellUpgrade, ReleasePublished
from common.releases import Release
from common.requests.rollout import RolloutList
from common.vocabulary import Stage, UpgradePhase
from common.wiring import start
from services.rollout import controller as controller_module
from services.rollout import handlers
from services.rollout.bootstrap import setup
from services.rollout.controller import Controller
from services.rollout.model import RolloutPolicy, SoakTimes, catch_up, new_rollout, stage_counts
from services.rollout.model.table import CellTable
from services.rollout.settings import RolloutSettings
from services.rollout.store import (
    GENERATION,
    LEASE,
    OUTBOX,
    PREFIX,
    FenceLost,
    RolloutStore,
    Stale,
)
from testing.polling import eventually
from testing.services import Services

RELEASE = Release.model_validate({
    "version": "2026.11.5",
    "components": [{"name": "api", "image": "r/api", "digest": "sha256:" + "c" * 64}],
})  # fmt: skip


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url, decode_responses=True)
    # Rollout's keys are fixed names; this test owns them while it runs (tests run one by one).
    keys = [k async for k in client.scan_iter("rollout:*")]
    if keys:
        await client.delete(*keys)
    yield client
    keys = [k async for k in client.scan_iter("rollout:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def _fleet(store: RolloutStore, clock: FakeClock) -> None:
    await store.set_policy(RolloutPolicy(soak_seconds=SoakTimes(staging=60, saas=0, dedicated=0)))
    stages: list[Stage] = ["staging", "staging", "dedicated"]
    for i, stage in enumerate(stages):
        await store.fleet.apply(_registered(f"c-{i}", stage, clock))
    assert await store.publish(
        RELEASE, at=clock.now(), by="op-test", event=_event(clock),
        rollout=new_rollout(RELEASE, clock.now()),
    )  # fmt: skip


def _registered(cell_id: str, stage: Stage, clock: FakeClock) -> CellRegistered:
    return CellRegistered(
        at=clock.now(), cell_id=cell_id, stage=stage, region="eu-west-1", org="acme",
        aws_account_id="123456789012", agent_version="1",
    )  # fmt: skip


def _report(cell_id: str, generation: int, phase: UpgradePhase, version: str,
            error: str | None = None) -> CellUpgrade:  # fmt: skip
    return CellUpgrade(
        cell_id=cell_id, seq=generation * 10, sent_at=datetime.now(UTC), generation=generation,
        release_version=version, phase=phase, error=error,
    )  # fmt: skip


def _event(clock: FakeClock) -> ReleasePublished:
    return ReleasePublished(at=clock.now(), release=RELEASE)


async def _outbox_types(redis: aioredis.Redis) -> list[str]:
    return [json.loads(e)["type"] for e in await redis.lrange(OUTBOX, 0, -1)]


async def test_a_step_is_written_whole_and_a_new_controller_repeats_nothing(
    redis: aioredis.Redis,
) -> None:
    clock = FakeClock()
    store = RolloutStore(redis)
    await _fleet(store, clock)
    first = Controller(store, clock, Lease(redis, LEASE, 5))
    assert await first.tick()

    staging = [await store.cell("c-0"), await store.cell("c-1")]
    assert all(c and c.desired_version == RELEASE.version for c in staging)
    assert {c.desired_generation for c in staging if c} == {1, 2}
    dedicated = await store.cell("c-2")
    assert dedicated and dedicated.desired_generation is None
    types = await _outbox_types(redis)
    assert types.count("command.desired-state.v1") == 2
    assert "release.published.v1" in types and "rollout.progressed.v1" in types
    rollout = await store.rollout(RELEASE.version)
    assert rollout and rollout.stage == "staging" and rollout.rev == 1

    # The first controller "dies"; its lease is given up, and a new one steps from Redis.
    await first.lease.release()
    second = Controller(store, clock, Lease(redis, LEASE, 5))
    assert await second.tick()
    assert await redis.get(GENERATION) == "2", "no desired state was sent again"
    assert (await _outbox_types(redis)).count("command.desired-state.v1") == 2
    assert (await store.rollout(RELEASE.version)) == rollout

    # The cells report; the stage finishes and soaks; the next step after the soak starts
    # dedicated, once.
    for cell in staging:
        assert cell and cell.desired_generation
        await store.upgrade(
            _report(cell.id, cell.desired_generation, "succeeded", RELEASE.version), clock.now()
        )
    assert await second.tick()
    soaking = await store.rollout(RELEASE.version)
    assert soaking and soaking.state == "soaking"
    clock.advance(61)
    assert await second.tick() and await second.tick()
    dedicated = await store.cell("c-2")
    assert dedicated and dedicated.desired_generation == 3
    assert await redis.get(GENERATION) == "3"


async def test_outcomes_wake_the_controller_once_the_wave_may_be_done(
    redis: aioredis.Redis,
) -> None:
    """A step on every outcome report kept a core half busy through a large rollout; an
    outcome now wakes the controller only when enough have come in to finish the wave (or at
    once when it is a failure, which may halt it), and the controller carries on to the end."""
    clock = FakeClock()
    store = RolloutStore(redis)
    await _fleet(store, clock)
    # Ticks far apart: only a wake makes it step within the test.
    controller = Controller(store, clock, Lease(redis, LEASE, 120), tick_seconds=60)
    controller.outcome_reported(failed=False)
    assert not controller.woken, "no wave waits yet: a success waits for the tick"
    controller = Controller(store, clock, Lease(redis, LEASE, 120), tick_seconds=60)
    assert await controller.tick()  # staging's wave: c-0 and c-1 sent
    assert not controller.woken

    controller.outcome_reported(failed=False)
    assert not controller.woken, "one of the wave's two outcomes cannot finish it"
    controller.outcome_reported(failed=False)
    assert controller.woken, "the second may"

    # What counts is what came in since a step began: a step resets the count.
    stop = asyncio.Event()
    run = asyncio.create_task(controller.run(stop))
    try:
        await eventually(lambda: not controller.woken, interval=0.01, what="the first step")
        controller.outcome_reported(failed=False)
        assert not controller.woken
        controller.outcome_reported(failed=True)
        assert controller.woken, "a failure may halt the wave: step soon"

        # The two cells succeed; their outcomes wake the controller, which finishes the wave
        # (soaking: staging soaks 60 s) long before its tick.
        for cell_id in ("c-0", "c-1"):
            cell = await store.cell(cell_id)
            assert cell and cell.desired_generation
            await store.upgrade(
                _report(cell_id, cell.desired_generation, "succeeded", RELEASE.version),
                clock.now(),
            )
            controller.outcome_reported(failed=False)

        async def soaking() -> bool:
            r = await store.rollout(RELEASE.version)
            return r is not None and r.state == "soaking"

        await eventually(soaking, what="staging's wave finished (a 60-s tick away otherwise)")
    finally:
        stop.set()
        await run


async def test_only_the_lease_holder_steps_and_a_stale_holder_is_refused(
    redis: aioredis.Redis,
) -> None:
    clock = FakeClock()
    store = RolloutStore(redis)
    await _fleet(store, clock)
    a = Controller(store, clock, Lease(redis, LEASE, 0.3))
    b = Controller(store, clock, Lease(redis, LEASE, 0.3))
    assert await a.tick()
    assert not await b.tick(), "the other replica waits"
    fence_a = a.lease.value
    assert fence_a is not None

    # a stalls past its TTL; b takes over with a newer token.
    await asyncio.sleep(0.4)
    assert await b.tick()
    assert b.lease.value is not None and b.lease.value != fence_a
    rollout = await store.rollout(RELEASE.version)
    assert rollout is not None
    with pytest.raises(FenceLost):
        await store.commit(fence_a, rollout=rollout.model_copy(update={"state": "paused"}),
                           expected_rev=rollout.rev, at=clock.now())  # fmt: skip
    after = await store.rollout(RELEASE.version)
    assert after and after.state == "in_progress", "the stale write changed nothing"


async def test_a_write_based_on_an_old_read_is_refused(redis: aioredis.Redis) -> None:
    clock = FakeClock()
    store = RolloutStore(redis)
    await _fleet(store, clock)
    read = await store.rollout(RELEASE.version)
    assert read is not None
    await store.save_rollout(read.model_copy(update={"state": "paused"}), read.rev)
    with pytest.raises(Stale):
        await store.save_rollout(read.model_copy(update={"state": "aborted"}), read.rev)
    now = await store.rollout(RELEASE.version)
    assert now and (now.state, now.rev) == ("paused", read.rev + 1)


async def test_reports_out_of_order_do_not_undo_a_newer_one(redis: aioredis.Redis) -> None:
    clock = FakeClock()
    store = RolloutStore(redis)
    await store.fleet.apply(_registered("c-9", "saas", clock))
    at, v = clock.now(), RELEASE.version
    assert await store.upgrade(_report("c-9", 2, "succeeded", v), at)
    # A redelivered step of the same generation, and an older generation, are both dropped.
    assert not await store.upgrade(_report("c-9", 2, "applying", v), at)
    assert not await store.upgrade(_report("c-9", 1, "failed", "2026.1.1", error="x"), at)
    cell = await store.cell("c-9")
    assert cell and (cell.report_generation, cell.report_phase, cell.installed_release) == (
        2, "succeeded", v,
    )  # fmt: skip
    assert not await store.upgrade(_report("nobody", 1, "accepted", v), at)


def _steps() -> float:
    return REGISTRY.get_sample_value("substrate_rollout_step_seconds_count") or 0.0


async def test_fleet_changes_wait_for_the_tick_and_operators_wake_the_controller(
    fresh_services: Services,
) -> None:
    """The rollout service as it runs, on a broker and Redis of its own. In a registration
    storm every `cell.registered` event woke the controller for a step over the whole fleet
    (as much CPU as the registry spent registering); fleet changes now wait for the tick,
    while an operator's action still wakes it at once."""
    settings = RolloutSettings(
        amqp_url=fresh_services.amqp_url, redis_url=fresh_services.redis_url,
        rabbitmq_api_url=fresh_services.api_url, tick_seconds=60,
    )  # fmt: skip
    bus = await RabbitBus.connect(fresh_services.amqp_url, name="test-rollout-wiring")
    await bus.declare(topology.control_plane())
    before = _steps()
    cleanup = await start("rollout", bus, settings, await setup(bus, settings))
    redis = aioredis.from_url(fresh_services.redis_url, decode_responses=True)
    store = RolloutStore(redis)
    try:
        first = await eventually(lambda: _steps() > before and _steps(), what="the first step")
        clock = FakeClock()
        for i in range(20):
            await bus.publish(_registered(f"c-{i}", "dedicated", clock))

        async def all_known() -> bool:
            return bool(await redis.hlen(PREFIX + "fleet") == 20)

        await eventually(all_known, what="rollout has every registration")
        assert _steps() == first, "20 registrations made no step before the tick"

        await bus.request(
            "rollout", "release.publish", {"release": RELEASE.model_dump(mode="json")}
        )
        await eventually(lambda: _steps() > first, what="a step woken by the new release")

        async def canary_sent() -> bool:
            cells = [await store.cell(f"c-{i}") for i in range(20)]
            return any(c and c.desired_generation for c in cells)

        await eventually(canary_sent, what="the dedicated canary's desired state")
    finally:
        await cleanup()
        await redis.aclose()
        await bus.close(drain_timeout=5)


async def test_a_quiet_fleet_is_not_stepped_over_again_until_something_changes(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between rollouts the same step over an unchanged fleet (0.17 s of catch_up and gauges
    at 100,000 cells, every tick) is skipped; a new cell, an operator's change or a new release
    is still acted on at the next step."""
    looked: list[int] = []

    def counting(cells: Iterable[Any], rollouts: list[Any], *args: Any, **kwargs: Any) -> Any:
        cells = list(cells)
        looked.append(len(cells))
        return catch_up(cells, rollouts, *args, **kwargs)

    monkeypatch.setattr(controller_module, "catch_up", counting)
    clock = FakeClock()
    store = RolloutStore(redis)
    await store.set_policy(RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=0)))
    await store.fleet.apply(_registered("c-0", "staging", clock))
    assert await store.publish(
        RELEASE, at=clock.now(), by="op-test", event=_event(clock),
        rollout=new_rollout(RELEASE, clock.now()),
    )  # fmt: skip
    controller = Controller(store, clock, Lease(redis, LEASE, 120))

    async def completed() -> bool:
        r = await store.rollout(RELEASE.version)
        return r is not None and r.state == "completed"

    assert await controller.tick()
    cell = await store.cell("c-0")
    assert cell and cell.desired_generation
    await store.upgrade(
        _report("c-0", cell.desired_generation, "succeeded", RELEASE.version), clock.now()
    )
    for _ in range(10):  # through staging, then saas and dedicated with no cell in them
        if await completed():
            break
        clock.advance(1)
        assert await controller.tick()
    assert await completed()

    async def quiet() -> None:
        """Steps until one has nothing to do; the one after it is skipped."""
        for _ in range(5):
            before = len(looked)
            assert await controller.tick()
            if len(looked) == before:
                return
        raise AssertionError("every step looked at the fleet again")

    await quiet()
    before = len(looked)
    assert await controller.tick() and await controller.tick()
    assert len(looked) == before, "an unchanged fleet between rollouts is not stepped over"

    # A cell registers: its first install (the completed release) goes with the next step.
    await store.fleet.apply(_registered("c-1", "dedicated", clock))
    assert await controller.tick()
    new = await store.cell("c-1")
    assert new and new.desired_version == RELEASE.version
    await quiet()

    # An operator's change to the policy is a change too.
    await store.set_policy(RolloutPolicy(soak_seconds=SoakTimes(staging=5, saas=0, dedicated=0)))
    before = len(looked)
    assert await controller.tick()
    assert len(looked) == before + 1


async def test_a_fleet_with_no_rollout_under_way_is_never_held_as_a_record_a_cell(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new leader over a fleet whose rollouts are done (a restart) counts it, catches it up
    and sets the gauges in one pass that builds a record at a time: it never holds a record
    for every cell, which at 100,000 cells raised the service's peak by 31 MB and left part
    of it behind. Once a step has nothing to do, the next looks at the cells that changed
    alone, and the gauges follow them. A rollout under way still builds the records once for
    its step."""
    clock = FakeClock()
    store = RolloutStore(redis)
    await store.set_policy(RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=0)))
    for i in range(3):
        await store.fleet.apply(_registered(f"c-{i}", "dedicated", clock))
    done = new_rollout(RELEASE, clock.now()).model_copy(update={"state": "completed"})
    assert await store.publish(RELEASE, at=clock.now(), by="op-test", event=_event(clock),
                               rollout=done)  # fmt: skip
    built: list[int] = []
    real_cells = CellTable.cells

    def cells(table: CellTable) -> Any:
        built.append(len(table))
        return real_cells(table)

    looked: list[list[str]] = []

    def looking(cells: Iterable[Any], *args: Any, **kwargs: Any) -> Any:
        cells = list(cells)
        looked.append(sorted(c.id for c in cells))
        return catch_up(cells, *args, **kwargs)

    monkeypatch.setattr(CellTable, "cells", cells)
    monkeypatch.setattr(controller_module, "catch_up", looking)

    def gauge(stage: str) -> float | None:
        return REGISTRY.get_sample_value(
            "substrate_rollout_cells", {"stage": stage, "release": "none"}
        )

    controller = Controller(store, clock, Lease(redis, LEASE, 120))
    assert await controller.tick()
    # Caught up in that pass: the cells are sent the completed release, and counted.
    assert looked == [["c-0", "c-1", "c-2"]]
    cell = await store.cell("c-0")
    assert cell is not None and cell.desired_version == RELEASE.version
    counted = await store.tally()
    assert counted is not None and counted.counts[RELEASE.version]["dedicated"]["in_progress"] == 3
    assert gauge("dedicated") == 3
    assert await controller.tick() and looked[-1] == ["c-0", "c-1", "c-2"]  # sent: look again
    assert await controller.tick() and len(looked) == 2  # nothing to do: not looked again

    # Two cells register: the next step looks at them alone, sends them theirs and counts them.
    await store.fleet.apply(_registered("c-3", "dedicated", clock))
    await store.fleet.apply(_registered("c-4", "staging", clock))
    assert await controller.tick()
    assert looked[-1] == ["c-3", "c-4"]
    for new_id in ("c-3", "c-4"):
        new = await store.cell(new_id)
        assert new is not None and new.desired_version == RELEASE.version
    assert (gauge("dedicated"), gauge("staging")) == (4, 1)
    assert built == [], "a step with no rollout under way built every cell's record"

    newer = RELEASE.model_copy(update={"version": "2026.11.6"})
    assert await store.publish(newer, at=clock.now(), by="op-test", event=_event(clock),
                               rollout=new_rollout(newer, clock.now()))  # fmt: skip
    assert await controller.tick()
    assert built, "a rollout's step reads the records it builds once"
    assert looked[-1] == ["c-0", "c-1", "c-2", "c-3", "c-4"]
    assert (gauge("dedicated"), gauge("staging")) == (4, 1)


async def test_views_read_the_leader_s_counts_which_follow_every_change(
    redis: aioredis.Redis,
) -> None:
    """rollout status reads the counts the leading controller keeps (no read of the fleet);
    they are the counts over every cell after each step, a new leader counts anew, and with no
    leader the view counts the cells itself."""
    clock = FakeClock()
    store = RolloutStore(redis)
    deps = handlers.Deps(store=store, clock=clock)
    await _fleet(store, clock)

    async def over_every_cell() -> dict[str, dict[str, int]]:
        rollout = await store.rollout(RELEASE.version)
        assert rollout is not None
        cells = await store.cells()
        return stage_counts(rollout, cells, await store.policy(), clock.now())

    async def viewed() -> dict[str, dict[str, int]]:
        [view] = await handlers.rollout_list(RolloutList(), None, deps)  # type: ignore[arg-type]
        return {stage: counts.model_dump() for stage, counts in view.stages.items()}

    assert await store.tally() is None, "no controller has counted yet"
    assert (await viewed())["staging"]["pending"] == 2  # counted by the view itself
    first = Controller(store, clock, Lease(redis, LEASE, 5))
    assert await first.tick()
    counted = await store.tally()
    assert counted is not None and counted.counts[RELEASE.version] == await over_every_cell()
    assert counted.counts[RELEASE.version]["staging"]["in_progress"] == 2
    assert await viewed() == await over_every_cell()

    # A cell reports (another process writes it): the next step counts it.
    cell = await store.cell("c-0")
    assert cell is not None and cell.desired_generation is not None
    await store.upgrade(
        _report("c-0", cell.desired_generation, "failed", RELEASE.version, "boom"), clock.now()
    )
    assert await first.tick()
    assert (await viewed())["staging"]["failed"] == 1
    assert await viewed() == await over_every_cell()

    # The other cell never reports: past the deadline it is counted timed out (failed).
    clock.advance((await store.policy()).progress_deadline_seconds + 1)
    assert await first.tick()
    assert (await viewed())["staging"]["failed"] == 2
    assert await viewed() == await over_every_cell()

    # The leader goes: its counts are no longer read. A new leader counts the fleet anew.
    await first.lease.release()
    assert await store.tally() is None
    assert await viewed() == await over_every_cell()
    second = Controller(store, clock, Lease(redis, LEASE, 5))
    assert await second.tick()
    counted = await store.tally()
    assert counted is not None and counted.counts[RELEASE.version] == await over_every_cell()


async def test_views_asked_together_with_no_leader_share_one_count(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no controller's counts to read (a restart), views asked while one counts the fleet
    wait for that count instead of each reading every cell; a view asked after it counts
    anew."""
    clock = FakeClock()
    store = RolloutStore(redis)
    deps = handlers.Deps(store=store, clock=clock)
    await _fleet(store, clock)
    reads, tallied, gate = 0, 0, asyncio.Event()
    real_each_cell, real_tally = store.each_cell, store.tally

    async def each_cell(keep: Any) -> None:
        nonlocal reads
        reads += 1
        await gate.wait()
        await real_each_cell(keep)

    async def tally() -> Any:
        nonlocal tallied
        counted = await real_tally()
        tallied += 1  # the view goes on to its count without awaiting anything else
        return counted

    monkeypatch.setattr(store, "each_cell", each_cell)
    monkeypatch.setattr(store, "tally", tally)

    async def viewed() -> dict[str, dict[str, int]]:
        [view] = await handlers.rollout_list(RolloutList(), None, deps)  # type: ignore[arg-type]
        return {stage: counts.model_dump() for stage, counts in view.stages.items()}

    views = [asyncio.create_task(viewed()) for _ in range(3)]
    await eventually(lambda: tallied == 3, timeout=10)
    gate.set()
    first, *others = await asyncio.gather(*views)
    assert reads == 1, "each view read the fleet"
    assert first["staging"]["pending"] == 2 and all(other == first for other in others)
    assert deps.counting == {}
    assert await viewed() == first and reads == 2
