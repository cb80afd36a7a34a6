"""The registry's handlers and store against real Redis (the broker side faked): ordering,
account binding, liveness on the registry's clock, and events written with their state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from common import sealing
from common.bus.errors import Refused, RpcFailure
from common.clock import FakeClock
from common.messages import (
    CellHeartbeat,
    CellMaintenance,
    CellRegister,
    Delivery,
    Message,
    SealedRotateCredentials,
)
from common.requests import Status
from common.requests.registry import (
    MAX_PAGE,
    CellsCreate,
    CellsDecommission,
    CellsList,
    CellsRotateCredentials,
    RegistryServiceStatus,
)
from services.registry import handlers, metrics
from services.registry.store import OUTBOX, RegistryStore
from testing.cells import new_cell_id
from testing.services import Services

ACCOUNT = "123456789012"
OTHER_ACCOUNT = "210987654321"


class FakeAccounts:
    def __init__(self) -> None:
        self.users: dict[str, str] = {}
        self.fail_provision = False
        self.closed: list[str] = []
        self.queues_ensured: list[str] = []
        self.queues: set[str] = set()
        # Stands for the registry's command queue topology: a new one is declared again.
        self.topology = "v1"

    async def provision(self, cell_id: str, password: str) -> None:
        self.users[cell_id] = password
        if self.fail_provision:
            raise RuntimeError("management API down")
        self.queues.add(cell_id)

    async def deprovision(self, cell_id: str) -> None:
        self.users.pop(cell_id, None)
        self.queues.discard(cell_id)

    async def set_password(self, cell_id: str, password: str) -> None:
        self.users[cell_id] = password

    async def close_connections(self, cell_id: str, reason: str) -> int:
        self.closed.append(cell_id)
        return 1

    async def socket_limit(self) -> int | None:
        return 1000

    async def ensure_queue(self, cell_id: str) -> None:
        self.queues_ensured.append(cell_id)
        self.queues.add(cell_id)

    def queue_fingerprint(self, cell_id: str) -> str:
        return f"{self.topology}:{cell_id}"

    async def queue_exists(self, cell_id: str) -> bool:
        return cell_id in self.queues


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def publish(self, message: Message) -> None:
        self.sent.append(message)


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url, decode_responses=True)
    for key in await client.keys("registry:*"):
        await client.delete(key)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 3, 1, tzinfo=UTC))


@pytest.fixture
def deps(redis: aioredis.Redis, clock: FakeClock) -> handlers.Deps:
    return handlers.Deps(
        store=RegistryStore(redis),
        clock=clock,
        accounts=FakeAccounts(),
        publisher=FakePublisher(),
        cell_broker_url="amqp://x:y@broker:5672/",
        privatelink_service="com.amazonaws.vpce.eu-west-1.vpce-svc-test",
        offline_after=90,
        credential_grace=600,
    )


def delivery(cell_id: str, kind: str, user_id: str | None = None) -> Delivery:
    return Delivery(
        message_id=None,
        user_id=cell_id if user_id is None else user_id,
        routing_key=f"{cell_id}.{kind}",
        redelivered=False,
        delivery_count=0,
    )


async def create(deps: handlers.Deps, cell_id: str, **extra: str) -> dict[str, object]:
    params = {"id": cell_id, "stage": "dedicated", "region": "eu-west-1", "org": "acme", **extra}
    request = CellsCreate.model_validate(params)
    created = await handlers.cells_create(request, delivery(cell_id, "rpc"), deps=deps)
    return created.model_dump(mode="json")


# The agent's key: rotated secrets are sealed to its public half.
AGENT_KEY = sealing.new_private_key()


async def registered(deps: handlers.Deps, key: str | None = AGENT_KEY) -> str:
    """A new cell, created and registered from ACCOUNT with sequence number 1, presenting the
    public half of ``key`` (None: an agent from before sealing)."""
    cell = new_cell_id()
    await create(deps, cell)
    public = sealing.public_key(key) if key else None
    await handlers.on_cell_register(
        register_msg(cell, 1, rotation_key=public), delivery(cell, "register"), deps=deps
    )
    return cell


def register_msg(cell_id: str, seq: int, account: str = ACCOUNT, **kw: str | None) -> CellRegister:
    fields = {"agent_version": "1.0", "region": "eu-west-1", "incarnation": "i1", **kw}
    return CellRegister(
        cell_id=cell_id, seq=seq, sent_at=datetime.now(UTC), aws_account_id=account, **fields
    )


def heartbeat_msg(
    cell_id: str, seq: int, sent_at: datetime | None = None, **kw: object
) -> CellHeartbeat:
    return CellHeartbeat(
        cell_id=cell_id,
        seq=seq,
        sent_at=sent_at or datetime.now(UTC),
        agent_version="1.0",
        **kw,
    )


async def outbox_types(redis: aioredis.Redis) -> list[str]:
    return [json.loads(e)["type"] for e in await redis.lrange(OUTBOX, 0, -1)]


async def test_create_refuses_duplicates_and_undoes_a_failed_provision(
    deps: handlers.Deps, redis: aioredis.Redis
) -> None:
    cell = new_cell_id()
    created = await create(deps, cell)
    assert created["status"] == "created"
    assert str(created["amqp_url"]).startswith(f"amqp://{cell}:")
    with pytest.raises(RpcFailure, match="already exists"):
        await create(deps, cell)

    broken = new_cell_id()
    accounts = deps.accounts
    assert isinstance(accounts, FakeAccounts)
    accounts.fail_provision = True
    with pytest.raises(RuntimeError, match="management API down"):
        await create(deps, broken)
    assert broken not in accounts.users
    assert await deps.store.get(broken) is None
    accounts.fail_provision = False
    assert (await create(deps, broken))["id"] == broken  # the id is free again
    assert await outbox_types(redis) == ["cell.created.v1", "cell.created.v1"]


@pytest.mark.fault
async def test_registration_binds_the_account_and_refuses_another(
    deps: handlers.Deps, redis: aioredis.Redis
) -> None:
    cell = await registered(deps)
    view = await deps.store.get(cell)
    assert view is not None and view.status == "online" and view.aws_account_id == ACCOUNT

    with pytest.raises(Refused, match=f"bound to AWS account {ACCOUNT}"):
        await handlers.on_cell_register(
            register_msg(cell, 2, OTHER_ACCOUNT), delivery(cell, "register"), deps=deps
        )
    view = await deps.store.get(cell)
    assert view is not None and view.aws_account_id == ACCOUNT
    assert [r["aws_account_id"] for r in view.refused_registrations] == [OTHER_ACCOUNT]
    assert (await outbox_types(redis))[-2:] == [
        "cell.registered.v1",
        "cell.registration-refused.v1",
    ]


@pytest.mark.fault
async def test_concurrent_registrations_from_two_accounts_one_wins(deps: handlers.Deps) -> None:
    cell = new_cell_id()
    await create(deps, cell)
    results = await asyncio.gather(
        handlers.on_cell_register(register_msg(cell, 1), delivery(cell, "register"), deps=deps),
        handlers.on_cell_register(
            register_msg(cell, 1, OTHER_ACCOUNT), delivery(cell, "register"), deps=deps
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, Refused)]
    assert len(refused) == 1
    view = await deps.store.get(cell)
    assert view is not None and view.aws_account_id in (ACCOUNT, OTHER_ACCOUNT)
    assert len(view.refused_registrations) == 1
    assert view.refused_registrations[0]["aws_account_id"] != view.aws_account_id


async def test_an_account_given_at_creation_is_enforced_from_the_first_registration(
    deps: handlers.Deps,
) -> None:
    cell = new_cell_id()
    await create(deps, cell, aws_account=OTHER_ACCOUNT)
    with pytest.raises(Refused, match=OTHER_ACCOUNT):
        await handlers.on_cell_register(
            register_msg(cell, 1), delivery(cell, "register"), deps=deps
        )
    view = await deps.store.get(cell)
    assert view is not None and view.status == "created"


async def test_heartbeats_only_move_forward(deps: handlers.Deps) -> None:
    cell = await registered(deps)
    seen = []
    for seq, release in ((5, "2026.11.5"), (3, "2026.11.3"), (5, "2026.11.4"), (6, "2026.11.6")):
        await handlers.on_cell_heartbeat(
            heartbeat_msg(cell, seq, installed_release=release),
            delivery(cell, "heartbeat"),
            deps=deps,
        )
        view = await deps.store.get(cell)
        assert view is not None
        seen.append(view.installed_release)
    # An older (3) or repeated (5) sequence number never overwrites a newer state.
    assert seen == ["2026.11.5", "2026.11.5", "2026.11.5", "2026.11.6"]


async def test_a_reinstalled_agent_starts_a_new_sequence(deps: handlers.Deps) -> None:
    cell = new_cell_id()
    await create(deps, cell)
    await handlers.on_cell_register(register_msg(cell, 500), delivery(cell, "register"), deps=deps)
    # A fresh state directory: new incarnation, sequence from zero.
    await handlers.on_cell_register(
        register_msg(cell, 0, incarnation="i2"), delivery(cell, "register"), deps=deps
    )
    await handlers.on_cell_heartbeat(
        heartbeat_msg(cell, 1, installed_release="2026.12.1"),
        delivery(cell, "heartbeat"),
        deps=deps,
    )
    view = await deps.store.get(cell)
    assert view is not None and view.installed_release == "2026.12.1"


async def test_status_warns_when_the_cells_would_fill_the_brokers_sockets(
    deps: handlers.Deps,
) -> None:
    await create(deps, new_cell_id())
    status = await handlers.status(Status(), delivery("operator", "rpc"), deps)
    assert isinstance(status, RegistryServiceStatus)
    assert status.broker_socket_limit == 1000 and status.warnings == []
    assert handlers.socket_warnings(900, 1000) == []
    [warning] = handlers.socket_warnings(901, 1000)
    assert "901 cells" in warning and "1000 sockets" in warning and "open-files" in warning
    assert handlers.socket_warnings(10**6, None) == [], "no limit known: no guess"


async def test_heartbeat_from_an_unregistered_cell_changes_nothing(deps: handlers.Deps) -> None:
    cell = new_cell_id()
    await create(deps, cell)
    await handlers.on_cell_heartbeat(heartbeat_msg(cell, 1), delivery(cell, "heartbeat"), deps=deps)
    view = await deps.store.get(cell)
    assert view is not None and view.status == "created" and view.last_heartbeat_at is None


async def test_offline_and_back_on_the_registrys_clock_not_the_cells(
    deps: handlers.Deps, clock: FakeClock, redis: aioredis.Redis
) -> None:
    cell = await registered(deps)
    # The cell's clock is a day ahead: it must not keep the cell alive.
    future = clock.now() + timedelta(days=1)
    await handlers.on_cell_heartbeat(
        heartbeat_msg(cell, 2, sent_at=future), delivery(cell, "heartbeat"), deps=deps
    )
    clock.advance(89)
    assert await handlers.sweep(deps) == []
    clock.advance(2)
    assert await handlers.sweep(deps) == [cell]
    assert await handlers.sweep(deps) == [], "offline is announced once"
    view = await deps.store.get(cell)
    assert view is not None and view.status == "offline"

    # Days later (compressed): still there, not deleted; its next heartbeat brings it back.
    clock.advance(3 * 86400)
    await handlers.sweep(deps)
    # The cell's clock is now a day behind: still online by the registry's clock.
    past = clock.now() - timedelta(days=1)
    await handlers.on_cell_heartbeat(
        heartbeat_msg(cell, 3, sent_at=past), delivery(cell, "heartbeat"), deps=deps
    )
    view = await deps.store.get(cell)
    assert view is not None and view.status == "online"
    assert view.last_heartbeat_at == clock.now()
    types = await outbox_types(redis)
    assert types[-3:] == ["cell.registered.v1", "cell.offline.v1", "cell.online.v1"]


async def test_rotation_is_confirmed_by_a_heartbeat_carrying_the_new_credential(
    deps: handlers.Deps, clock: FakeClock
) -> None:
    cell = await registered(deps)
    result = await handlers.cells_rotate_credentials(
        CellsRotateCredentials(id=cell), delivery(cell, "rpc"), deps=deps
    )
    publisher = deps.publisher
    assert isinstance(publisher, FakePublisher)
    (command,) = publisher.sent
    assert command.routing_key() == cell
    # The new secret is in the command only sealed to the agent's key, for this rotation.
    assert isinstance(command, SealedRotateCredentials)
    new_password = result.amqp_url.split(":")[2].split("@")[0]
    assert new_password not in command.model_dump_json()
    assert sealing.unseal(AGENT_KEY, command.sealed_password, command.sealing_context()) == (
        new_password
    )
    view = await deps.store.get(cell)
    assert view is not None and view.credentials_pending

    await handlers.on_cell_heartbeat(
        heartbeat_msg(cell, 2, credential_id=result.credential_id),
        delivery(cell, "heartbeat"),
        deps=deps,
    )
    view = await deps.store.get(cell)
    assert view is not None and not view.credentials_pending
    assert view.credential_id == result.credential_id
    clock.advance(10_000)
    assert await deps.store.overdue_rotations(clock.now()) == []


async def test_a_cell_without_a_bound_key_is_sent_nothing_and_cut_off_at_once(
    deps: handlers.Deps,
) -> None:
    """An agent from before sealing (or a rotation with rebind): the new secret is not sent
    where a holder of the old one could read it; every connection closes now, the new
    credential is in force, and the operator delivers the URL by hand."""
    accounts = deps.accounts
    publisher = deps.publisher
    assert isinstance(accounts, FakeAccounts) and isinstance(publisher, FakePublisher)
    for cell, request in (
        (await registered(deps, key=None), CellsRotateCredentials),
        (await registered(deps), partial(CellsRotateCredentials, rebind=True)),
    ):
        publisher.sent.clear()
        result = await handlers.cells_rotate_credentials(
            request(id=cell), delivery(cell, "rpc"), deps=deps
        )
        assert result.status == "deliver_by_hand" and publisher.sent == []
        assert accounts.closed[-1] == cell
        view = await deps.store.get(cell)
        assert view is not None and not view.credentials_pending
        assert view.credential_id == result.credential_id and view.rotation_key is None


async def test_a_second_key_never_replaces_the_one_the_cell_first_registered(
    deps: handlers.Deps,
) -> None:
    """A holder of the cell's URL registering its own key does not get the next rotated
    secret sealed to it."""
    cell = await registered(deps)
    thief_key = sealing.new_private_key()
    await handlers.on_cell_register(
        register_msg(cell, 2, incarnation="thief", rotation_key=sealing.public_key(thief_key)),
        delivery(cell, "register"),
        deps=deps,
    )
    view = await deps.store.get(cell)
    assert view is not None and view.rotation_key == sealing.public_key(AGENT_KEY)
    await handlers.cells_rotate_credentials(
        CellsRotateCredentials(id=cell), delivery(cell, "rpc"), deps=deps
    )
    publisher = deps.publisher
    assert isinstance(publisher, FakePublisher)
    command = publisher.sent[-1]
    assert isinstance(command, SealedRotateCredentials)
    with pytest.raises(sealing.SealingError):
        sealing.unseal(thief_key, command.sealed_password, command.sealing_context())


async def test_decommissioned_cells_are_kept_and_refused(
    deps: handlers.Deps, redis: aioredis.Redis
) -> None:
    cell = await registered(deps)
    view = await handlers.cells_decommission(
        CellsDecommission(id=cell), delivery(cell, "rpc"), deps=deps
    )
    assert view.status == "decommissioned"
    accounts = deps.accounts
    assert isinstance(accounts, FakeAccounts) and cell not in accounts.users
    with pytest.raises(Refused, match="decommissioned"):
        await handlers.on_cell_register(
            register_msg(cell, 2), delivery(cell, "register"), deps=deps
        )
    await handlers.on_cell_heartbeat(heartbeat_msg(cell, 3), delivery(cell, "heartbeat"), deps=deps)
    after = await deps.store.get(cell)
    assert after is not None and after.status == "decommissioned"
    with pytest.raises(RpcFailure, match="decommissioned; ids are not reused"):
        await create(deps, cell)
    listed = await handlers.cells_list(
        CellsList(status="decommissioned"), delivery(cell, "rpc"), deps=deps
    )
    assert [c.id for c in listed] == [cell]
    # History, not fleet: a plain list leaves it out (before the page is cut), a list that
    # asks for it has it.
    plain = await handlers.cells_list(CellsList(), delivery(cell, "rpc"), deps=deps)
    assert cell not in [c.id for c in plain]
    every = await handlers.cells_list(
        CellsList(decommissioned=True), delivery(cell, "rpc"), deps=deps
    )
    assert cell in [c.id for c in every]


async def test_a_registration_declares_the_command_queue_only_when_missing_or_out_of_date(
    deps: handlers.Deps,
) -> None:
    """Declared at creation; a registration then only checks it exists. Deleted, or declared
    by a registry with another topology (a binding added since), it is declared again."""
    accounts = deps.accounts
    assert isinstance(accounts, FakeAccounts)
    cell = await registered(deps)
    assert accounts.queues_ensured == []
    seq = 1

    async def register_again() -> None:
        nonlocal seq
        seq += 1
        await handlers.on_cell_register(
            register_msg(cell, seq), delivery(cell, "register"), deps=deps
        )

    accounts.queues.discard(cell)  # someone deleted it
    await register_again()
    assert accounts.queues_ensured == [cell] and cell in accounts.queues
    await register_again()
    assert accounts.queues_ensured == [cell]
    accounts.topology = "v2"  # a newer registry declares more
    await register_again()
    await register_again()
    assert accounts.queues_ensured == [cell, cell]


async def test_an_agent_that_looks_for_its_queue_is_taken_at_its_word_only_when_it_is_there(
    deps: handlers.Deps,
) -> None:
    """An agent that looks for its command queue itself (``queue_missing`` False) costs the
    registry no check; one that says the queue is missing gets it declared again, and one
    that says so of a queue that is there gets nothing but the registry's own check."""
    accounts = deps.accounts
    assert isinstance(accounts, FakeAccounts)
    cell = await registered(deps)
    checked: list[str] = []
    exists = accounts.queue_exists

    async def counted(cell_id: str) -> bool:
        checked.append(cell_id)
        return await exists(cell_id)

    accounts.queue_exists = counted  # type: ignore[method-assign]
    seq = 1

    async def register_again(missing: bool | None) -> None:
        nonlocal seq
        seq += 1
        msg = register_msg(cell, seq).model_copy(update={"queue_missing": missing})
        await handlers.on_cell_register(msg, delivery(cell, "register"), deps=deps)

    await register_again(False)
    assert checked == [] and accounts.queues_ensured == []
    await register_again(True)  # a false alarm: checked, not declared
    assert checked == [cell] and accounts.queues_ensured == []
    accounts.queues.discard(cell)  # someone deleted it
    await register_again(False)  # the agent has not looked yet
    assert accounts.queues_ensured == []
    await register_again(True)
    assert accounts.queues_ensured == [cell] and cell in accounts.queues
    await register_again(None)  # an older agent: the registry looks
    assert checked == [cell, cell, cell] and accounts.queues_ensured == [cell]


async def test_cells_are_listed_page_by_page_in_id_order(deps: handlers.Deps) -> None:
    """A page holds at most ``limit`` cells by id, those after ``after``; following each page's
    last id reads every cell once, and a filter applies before the page is cut."""
    ids = [f"page-{i:02d}" for i in range(7)]
    for cell in reversed(ids):
        await create(deps, cell, stage="saas" if cell.endswith(("1", "4")) else "dedicated")
    seen: list[list[str]] = []
    after = None
    while True:
        page = await handlers.cells_list(
            CellsList(after=after, limit=3), delivery(ids[0], "rpc"), deps=deps
        )
        seen.append([c.id for c in page])
        if len(page) < 3:
            break
        after = page[-1].id
    assert seen == [ids[0:3], ids[3:6], ids[6:7]]
    saas = await handlers.cells_list(
        CellsList(stage="saas", after="page-01", limit=5), delivery(ids[0], "rpc"), deps=deps
    )
    assert [c.id for c in saas] == ["page-04"]
    with pytest.raises(ValidationError, match="limit"):
        CellsList(limit=MAX_PAGE + 1)


async def test_filters_apply_before_the_page_is_cut_from_indexes_or_from_the_records(
    deps: handlers.Deps, redis: aioredis.Redis
) -> None:
    """Every filter (stage, status, org, release, a selector with = and !=) is the
    registry's: a page holds ``limit`` cells that pass, however sparse they are among the ids,
    and following pages reads each passing cell once. Cells created before the id and org
    indexes are indexed at start."""
    ids = [f"flt-{i:02d}" for i in range(12)]
    for i, cell in enumerate(ids):
        region = "eu-west-1" if i % 3 == 0 else "us-east-1"
        await create(deps, cell, org=f"org-{i % 2}", region=region,
                     stage="saas" if i == 5 else "dedicated")  # fmt: skip
    await redis.hset("registry:cell:flt-07", "installed_release", "2026.12.1")
    await redis.hset("registry:cell:flt-10", "installed_release", "2026.12.1")

    async def listed(limit: int = 2, **filters: object) -> list[list[str]]:
        pages, after = [], None
        while True:
            request = CellsList.model_validate({**filters, "after": after, "limit": limit})
            page = await handlers.cells_list(request, delivery(ids[0], "rpc"), deps=deps)
            pages.append([c.id for c in page])
            if len(page) < limit:
                return pages
            after = page[-1].id

    assert await listed(org="org-1") == [ids[1:4:2], ids[5:8:2], ids[9:12:2], []]
    assert await listed(release="2026.12.1") == [["flt-07", "flt-10"], []]
    eu = [{"field": "region", "op": "=", "value": "eu-west-1"}]
    assert await listed(selector=eu, limit=3) == [["flt-00", "flt-03", "flt-06"], ["flt-09"]]
    not_dedicated = [{"field": "stage", "op": "!=", "value": "dedicated"}]
    assert await listed(selector=not_dedicated) == [["flt-05"]]
    both = [*eu, {"field": "org", "op": "=", "value": "org-1"}]
    assert await listed(selector=both) == [["flt-03", "flt-09"], []]
    assert await listed(org="org-1", selector=[{"field": "org", "op": "=", "value": "org-0"}]) == [
        []
    ]
    none_yet = [{"field": "installed_release", "op": "=", "value": ""}]
    assert [len(page) for page in await listed(selector=none_yet, limit=5)] == [5, 5, 0]
    await handlers.cells_decommission(CellsDecommission(id="flt-03"), delivery(ids[0], "rpc"), deps)
    assert await listed(selector=both) == [["flt-09"]]
    assert await listed(selector=both, decommissioned=True) == [["flt-03", "flt-09"], []]

    with pytest.raises(ValidationError, match="field"):
        CellsList.model_validate({"selector": [{"field": "password", "op": "=", "value": "x"}]})

    # A registry from before the id and org indexes: they are built when it starts.
    await redis.delete("registry:ids", "registry:org:org-0", "registry:org:org-1")
    assert await deps.store.build_indexes() == len(ids)
    assert await deps.store.build_indexes() == 0, "built once"
    assert await listed(org="org-0", limit=10) == [ids[0:12:2]]


async def test_an_unconfirmed_rotation_closes_the_old_session_after_the_grace_period(
    deps: handlers.Deps, clock: FakeClock
) -> None:
    cell = await registered(deps)
    result = await handlers.cells_rotate_credentials(
        CellsRotateCredentials(id=cell), delivery(cell, "rpc"), deps=deps
    )
    accounts = deps.accounts
    assert isinstance(accounts, FakeAccounts)
    clock.advance(deps.credential_grace - 1)
    # Keep it online meanwhile; it just never confirms.
    await handlers.on_cell_heartbeat(heartbeat_msg(cell, 2), delivery(cell, "heartbeat"), deps=deps)
    await handlers.sweep(deps)
    assert accounts.closed == []
    clock.advance(2)
    await handlers.sweep(deps)
    assert accounts.closed == [cell]
    view = await deps.store.get(cell)
    assert view is not None and not view.credentials_pending
    assert view.credential_id == result.credential_id
    await handlers.sweep(deps)
    assert accounts.closed == [cell], "closed once"


async def test_the_registry_records_how_long_each_cell_spent_in_maintenance(
    deps: handlers.Deps, clock: FakeClock
) -> None:
    cell = await registered(deps)

    def report(seq: int, enabled: bool) -> CellMaintenance:
        return CellMaintenance(
            cell_id=cell, seq=seq, sent_at=clock.now(), enabled=enabled,
            enabled_until=clock.now() + timedelta(minutes=15) if enabled else None,
        )  # fmt: skip

    await handlers.on_cell_maintenance(report(2, True), delivery(cell, "maintenance"), deps=deps)
    clock.advance(60)
    await handlers.sweep(deps)
    assert metrics.MAINTENANCE_AGE_MAX._value.get() >= 60
    view = await deps.store.get(cell)
    assert view is not None and view.maintenance and view.maintenance_since is not None
    clock.advance(60)
    await handlers.on_cell_maintenance(report(3, False), delivery(cell, "maintenance"), deps=deps)
    # A late duplicate of the first report changes nothing.
    await handlers.on_cell_maintenance(report(2, True), delivery(cell, "maintenance"), deps=deps)
    view = await deps.store.get(cell)
    assert view is not None and not view.maintenance and view.maintenance_since is None
    assert view.maintenance_seconds_total == 120


async def test_heartbeats_end_a_stay_in_maintenance_whose_end_was_never_reported(
    deps: handlers.Deps, clock: FakeClock
) -> None:
    """The 'left maintenance' report is lost: the next heartbeat (out of maintenance) ends the
    stay, so the age metric and the index do not show a state the cell left long ago."""
    cell = await registered(deps)
    entered = CellMaintenance(cell_id=cell, seq=2, sent_at=clock.now(), enabled=True,
                              enabled_until=clock.now() + timedelta(minutes=15))  # fmt: skip
    await handlers.on_cell_maintenance(entered, delivery(cell, "maintenance"), deps=deps)
    clock.advance(30)
    during = CellHeartbeat(cell_id=cell, seq=3, sent_at=clock.now(), agent_version="0.1.0",
                           maintenance=True)  # fmt: skip
    await handlers.on_cell_heartbeat(during, delivery(cell, "heartbeat"), deps=deps)
    view = await deps.store.get(cell)
    assert view is not None and view.maintenance_since is not None, "still in it"
    clock.advance(30)
    after = CellHeartbeat(cell_id=cell, seq=5, sent_at=clock.now(), agent_version="0.1.0",
                          maintenance=False)  # fmt: skip
    await handlers.on_cell_heartbeat(after, delivery(cell, "heartbeat"), deps=deps)
    view = await deps.store.get(cell)
    assert view is not None and not view.maintenance and view.maintenance_since is None
    assert view.maintenance_seconds_total == 60
    assert await deps.store.oldest_maintenance_epoch() is None, "out of the maintenance index"
    # The lost report arriving late changes nothing.
    left = CellMaintenance(cell_id=cell, seq=4, sent_at=clock.now(), enabled=False)
    await handlers.on_cell_maintenance(left, delivery(cell, "maintenance"), deps=deps)
    view = await deps.store.get(cell)
    assert view is not None and view.maintenance_seconds_total == 60
