"""Infrastructure deadlines against real Redis: each reminder and each breach fires once, by
one replica at a time, across a restart, and a stale holder's write is refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from common.bus.errors import RpcFailure
from common.clock import FakeClock
from common.lease import Lease
from common.messages import CellRegistered, CellTemplateChanged, Delivery
from common.requests.infra import InfraPublish, InfraStatus
from services.infra_compliance import handlers
from services.infra_compliance.model import Timer
from services.infra_compliance.store import LEASE, OUTBOX, InfraStore
from services.infra_compliance.timers import Timers
from testing.services import Services

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DELIVERY = Delivery(message_id="m", user_id="op-test", routing_key="infra_compliance",
                    redelivered=False, delivery_count=0)  # fmt: skip


def declaring(version: str) -> str:
    """A template whose stacks report ``version``."""
    return f"Resources: {{}}\nOutputs:\n  TemplateVersion:\n    Value: '{version}'\n"


class FakeAws:
    async def lint(self, template: str) -> list[str]:
        return [] if "Resources" in template else ["E1001 line 1: no Resources"]

    async def store(self, key: str, body: str) -> str:
        return f"s3://test-bucket/{key}"


class Notices:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, org: str, subject: str, message: str, notice_id: str) -> None:
        self.sent.append((org, subject))


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url, decode_responses=True)
    # The service's keys are fixed names; this test owns them while it runs.
    keys = [k async for k in client.scan_iter("infra_compliance:*")]
    if keys:
        await client.delete(*keys)
    yield client
    keys = [k async for k in client.scan_iter("infra_compliance:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def registered(cell_id: str, clock: FakeClock) -> CellRegistered:
    return CellRegistered(
        at=clock.now(), cell_id=cell_id, stage="dedicated", region="eu-west-1", org="acme",
        aws_account_id="123456789012", agent_version="1", template_version="1",
    )  # fmt: skip


async def outbox_types(redis: aioredis.Redis) -> list[str]:
    return [json.loads(e)["type"] for e in await redis.lrange(OUTBOX, 0, -1)]


def timers(store: InfraStore, clock: FakeClock, redis: aioredis.Redis, notices: Notices,
           deps: handlers.Deps, ttl: float = 5) -> Timers:  # fmt: skip
    return Timers(store, clock, Lease(redis, LEASE, ttl), notices,
                  lambda: handlers.reconcile_fleet(deps))  # fmt: skip


async def test_reminders_and_the_breach_fire_once_by_one_replica_across_a_restart(
    redis: aioredis.Redis,
) -> None:
    clock = FakeClock(T0)
    store = InfraStore(redis)
    deps = handlers.Deps(store=store, clock=clock, aws=FakeAws())
    for cell in ("c-late", "c-quick"):
        await store.fleet.apply(registered(cell, clock))
    published = await handlers.infra_publish(
        InfraPublish(version="2", template=declaring("2"), grace="14s"), DELIVERY, deps
    )
    assert published.deadline == T0 + timedelta(seconds=14)
    await handlers.reconcile_fleet(deps)
    view = await handlers.infra_status(InfraStatus(), DELIVERY, deps)
    assert {c.cell: c.state for c in view.cells} == {"c-late": "pending", "c-quick": "pending"}
    assert view.summary.breach_within_24h == 2

    notices = Notices()
    a, b = timers(store, clock, redis, notices, deps), timers(store, clock, redis, notices, deps)
    clock.advance(7.5)  # the first reminder (7 "days" left of 14) is due
    assert await a.tick() and not await b.tick(), "one replica fires"
    assert sorted(notices.sent) == [("acme", "Substrate: apply infrastructure template 2")] * 2
    assert not await b.tick() and await a.tick(), "and only once"
    assert len(notices.sent) == 2

    # The quick cell applies the template: compliant, its timers gone.
    quick = CellTemplateChanged(at=clock.now(), cell_id="c-quick", template_version="2",
                                previous_version="1")  # fmt: skip
    await handlers.on_fact(quick, DELIVERY, deps)

    # The holder restarts (a new process, the lease given up): the timers carry on from Redis.
    await a.lease.release()
    c = timers(store, clock, redis, notices, deps)
    clock.advance(4)  # the second reminder
    assert await c.tick()
    clock.advance(2)  # the third
    assert await c.tick() and not await b.tick()
    clock.advance(1)  # the deadline
    assert await c.tick()
    assert await c.tick()
    late = [s for o, s in notices.sent if "out of SLA" in s]
    assert late == ["Substrate: cell c-late is out of SLA"]
    assert len(notices.sent) == 2 + 2 + 1, "c-late: three reminders, then the breach, once"

    types = await outbox_types(redis)
    assert types.count("infra.reminder.v1") == 4  # c-late 3, c-quick 1 (before it applied)
    changed = [json.loads(json.loads(e)["body"]) for e in await redis.lrange(OUTBOX, 0, -1)
               if json.loads(e)["type"] == "infra.compliance-changed.v1"]  # fmt: skip
    assert [(e["cell_id"], e["status"]) for e in changed if e["status"] != "pending"] == [
        ("c-quick", "compliant"),
        ("c-late", "out_of_sla"),
    ]
    view = await handlers.infra_status(InfraStatus(), DELIVERY, deps)
    assert {c.cell: (c.state, c.reminders_sent) for c in view.cells} == {
        "c-late": ("out_of_sla", 3),
        "c-quick": ("compliant", 1),
    }


async def test_a_holder_that_lost_its_lease_cannot_fire(redis: aioredis.Redis) -> None:
    clock = FakeClock(T0)
    store = InfraStore(redis)
    deps = handlers.Deps(store=store, clock=clock, aws=FakeAws())
    await store.fleet.apply(registered("c-1", clock))
    await handlers.infra_publish(
        InfraPublish(version="2", template=declaring("2"), grace="14s"), DELIVERY, deps
    )
    await handlers.reconcile_fleet(deps)
    notices = Notices()
    a = timers(store, clock, redis, notices, deps, ttl=0.3)
    b = timers(store, clock, redis, notices, deps, ttl=0.3)
    assert await a.tick()
    stale = a.lease.value
    assert stale is not None
    await asyncio.sleep(0.4)  # a stalls past its lease; b takes over
    assert await b.tick()
    clock.advance(7.5)
    (due, *_) = await store.due(clock.now())
    raw = await store.record("c-1")
    written = await store.fire(a.lease, stale, due, raw, new=None, events=[], command=None,
                               notices=[])  # fmt: skip
    assert not written, "refused by Redis: the lease moved on"
    assert isinstance(due, Timer) and due in await store.due(clock.now())


async def test_publishing_refuses_a_template_that_is_not_newer_or_does_not_lint(
    redis: aioredis.Redis,
) -> None:
    clock = FakeClock(T0)
    store = InfraStore(redis)
    deps = handlers.Deps(store=store, clock=clock, aws=FakeAws())
    await handlers.infra_publish(InfraPublish(version="3", template=declaring("3")), DELIVERY, deps)
    for version, template, grace, needle in (
        ("3", declaring("3"), "14d", "already published"),
        ("2", declaring("2"), "14d", "older than 3"),
        ("4", "Outputs: {}", "14d", "fails cfn-lint: E1001"),
        ("4", declaring("4"), "two weeks", "grace: 'two weeks' is not a duration"),
        ("4", declaring("5"), "14d", "TemplateVersion output is '5', not '4'"),
        ("4", "Resources: {}", "14d", "TemplateVersion output is None"),
    ):
        with pytest.raises(RpcFailure, match=needle):
            await handlers.infra_publish(
                InfraPublish(version=version, template=template, grace=grace), DELIVERY, deps
            )
    assert [t.version for t in await store.templates()] == [3], "nothing else was stored"


async def test_a_cell_that_registers_again_is_told_what_is_required_again(
    redis: aioredis.Redis,
) -> None:
    """An agent with a new state directory has lost what it was told; it registers again."""
    clock = FakeClock(T0)
    store = InfraStore(redis)
    deps = handlers.Deps(store=store, clock=clock, aws=FakeAws())
    await handlers.on_fact(registered("c-1", clock), DELIVERY, deps)
    await handlers.infra_publish(
        InfraPublish(version="2", template=declaring("2"), grace="14s"), DELIVERY, deps
    )
    await handlers.reconcile_fleet(deps)
    assert (await outbox_types(redis)).count("command.infra-required.v1") == 1
    clock.advance(1)
    await handlers.on_fact(registered("c-1", clock), DELIVERY, deps)
    told = [json.loads(json.loads(e)["body"]) for e in await redis.lrange(OUTBOX, 0, -1)
            if json.loads(e)["type"] == "command.infra-required.v1"]  # fmt: skip
    assert [(t["cell_id"], t["status"], t["required_version"]) for t in told] == [
        ("c-1", "pending", "2"),
        ("c-1", "pending", "2"),
    ]
