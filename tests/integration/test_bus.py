"""The bus against a real RabbitMQ: delivery, unroutable publishes, dead letters with reasons,
the delivery limit, forged user_id, reconnects, and request/reply."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import aio_pika
import pytest

from common.bus.consume import DEAD_REASON_HEADER, KEPT_OF_OVERSIZED_BODY, ORIGINAL_BYTES_HEADER
from common.bus.errors import (
    BusError,
    PublishNacked,
    PublishRefused,
    RemoteError,
    RequestTimeout,
    RpcFailure,
    TryAgain,
    Unroutable,
)
from common.bus.rabbit_bus import RabbitBus
from common.messages import (
    CELLS_EXCHANGE,
    RPC_EXCHANGE,
    CellHeartbeat,
    CellOnline,
    CellSync,
    Delivery,
    RpcRequest,
    rpc_queue,
)
from common.requests import Request, Response
from common.routes import route
from common.topology import (
    DELIVERY_LIMIT,
    Binding,
    ExchangeSpec,
    QueueSpec,
    Topology,
    consuming_queue,
    control_plane,
    dead_letter_name,
)
from testing.broker import cell_queue, raw_publish, read_all
from testing.cells import heartbeat, new_cell_id
from testing.polling import eventually
from testing.ports import free_port
from testing.services import Services


async def test_message_published_by_one_bus_is_handled_by_another(
    bus: RabbitBus, other_bus: RabbitBus
) -> None:
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    received: list[tuple[CellHeartbeat, Delivery]] = []
    done = asyncio.Event()

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        received.append((msg, delivery))
        done.set()

    await other_bus.consume(queue, [route(CellHeartbeat, on_heartbeat)])
    await bus.publish(heartbeat(cell, seq=7), message_id="hb-7")
    await asyncio.wait_for(done.wait(), 15)

    msg, delivery = received[0]
    assert (msg.cell_id, msg.seq) == (cell, 7)
    assert delivery.user_id == bus.user
    assert delivery.routing_key == f"{cell}.heartbeat"
    assert delivery.message_id == "hb-7"
    assert (await bus.queue_state(queue)).messages == 0


async def test_unroutable_publish_raises(bus: RabbitBus) -> None:
    # Every cell report is bound by some service queue; this routing key is bound by none.
    event = CellOnline(cell_id="abc", at=datetime.now(UTC))
    with pytest.raises(Unroutable, match=r"substrate\.events/nobody\.listens"):
        await bus.publish(event, routing_key="nobody.listens")


async def test_bad_messages_are_dead_lettered_with_a_reason_and_the_stream_flows(
    services: Services, bus: RabbitBus
) -> None:
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    handled: list[int] = []
    last = asyncio.Event()

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        handled.append(msg.seq)
        if msg.seq == 2:
            last.set()

    await bus.consume(queue, [route(CellHeartbeat, on_heartbeat)])
    key = f"{cell}.heartbeat"
    await bus.publish(heartbeat(cell, seq=1))
    await raw_publish(
        services.amqp_url, CELLS_EXCHANGE, key, b"{not json", type="cell.heartbeat.v1"
    )
    wrong_schema = json.dumps({"cell_id": cell, "seq": "many"}).encode()
    await raw_publish(
        services.amqp_url, CELLS_EXCHANGE, key, wrong_schema, type="cell.heartbeat.v1"
    )
    valid_body = heartbeat(cell).model_dump_json().encode()
    await raw_publish(services.amqp_url, CELLS_EXCHANGE, key, valid_body, type="cell.nonsense.v9")
    await raw_publish(
        services.amqp_url, CELLS_EXCHANGE, key, b"\xff\xfe{", type="cell.heartbeat.v1"
    )
    nested = b"[" * 5000 + b"]" * 5000
    await raw_publish(services.amqp_url, CELLS_EXCHANGE, key, nested, type="cell.heartbeat.v1")
    await raw_publish(
        services.amqp_url, CELLS_EXCHANGE, key, b" " * 300_000, type="cell.heartbeat.v1"
    )
    await bus.publish(heartbeat(cell, seq=2))

    await asyncio.wait_for(last.wait(), 10)
    assert handled == [1, 2]
    dead_queue = dead_letter_name(queue)
    await eventually(lambda: _count_is(bus, dead_queue, 6), what="six dead letters", timeout=10)
    dead = await read_all(services.amqp_url, dead_queue)
    reasons = [m.headers[DEAD_REASON_HEADER] for m in dead]
    assert len(reasons) == 6
    assert "Invalid JSON" in str(reasons[0])
    assert "seq" in str(reasons[1]) and "sent_at" in str(reasons[1])
    assert "unknown type 'cell.nonsense.v9'" in str(reasons[2])
    assert str(reasons[3]).startswith("invalid cell.heartbeat.v1")
    assert str(reasons[4]).startswith("invalid cell.heartbeat.v1")
    assert "exceeds" in str(reasons[5])
    # The reason is kept, not a copy of the oversized body: its first bytes and its size.
    assert len(dead[5].body) == KEPT_OF_OVERSIZED_BODY
    assert dead[5].headers[ORIGINAL_BYTES_HEADER] == 300_000


async def _count_is(bus: RabbitBus, queue: str, n: int) -> bool:
    return (await bus.queue_state(queue)).messages == n


async def _queue_messages(services: Services, queue: str) -> int:
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def test_a_dead_letter_that_cannot_be_published_goes_back_and_the_stream_is_acked(
    services: Services, bus: RabbitBus
) -> None:
    """With its dead letter queue gone (deleted by hand) a bad message cannot be moved there:
    it goes back to its queue after a pause instead of staying unsettled, which would hold
    back the acks of every delivery after it on the channel until the prefetch filled."""
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    dead_queue = dead_letter_name(queue)
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(dead_queue)
    bus.handler_retry_seconds = 0.05
    handled = asyncio.Event()

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        handled.set()

    await bus.consume(queue, [route(CellHeartbeat, on_heartbeat)])
    await raw_publish(
        services.amqp_url, CELLS_EXCHANGE, f"{cell}.heartbeat", b"{not json",
        type="cell.heartbeat.v1",
    )  # fmt: skip
    await bus.publish(heartbeat(cell))
    await asyncio.wait_for(handled.wait(), 15)

    # The dead letter queue back: the bad message gets there at one of its next tries.
    await cell_queue(bus, cell)
    await eventually(lambda: _count_is(bus, dead_queue, 1), what="the dead letter", timeout=15)
    # Both settled: nothing is left unacked to come back when the consumer goes.
    await bus.close(drain_timeout=5)
    assert (await _queue_messages(services, queue)) == 0


async def test_handler_that_always_raises_is_dead_lettered_after_the_delivery_limit(
    services: Services, bus: RabbitBus
) -> None:
    cell = new_cell_id()
    queue = await cell_queue(bus, cell, "heartbeat", "sync")
    attempts: list[int] = []
    at: list[float] = []
    synced = asyncio.Event()
    bus.handler_retry_seconds = 0.1

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        attempts.append(delivery.delivery_count)
        at.append(asyncio.get_running_loop().time())
        raise RuntimeError("store is on fire")

    async def on_sync(msg: CellSync, delivery: Delivery) -> None:
        synced.set()

    await bus.consume(queue, [route(CellHeartbeat, on_heartbeat), route(CellSync, on_sync)])
    await bus.publish(heartbeat(cell))
    dead_queue = dead_letter_name(queue)
    await eventually(lambda: _count_is(bus, dead_queue, 1), what="dead letter", timeout=15)

    assert len(attempts) == DELIVERY_LIMIT
    assert attempts == sorted(attempts)
    # Each try waited for the one before it to be held a pause that doubles: 0.1, 0.2, 0.4 s...
    # (less a few ms: the event loop's clock counts whole milliseconds).
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert all(gap >= 0.1 * 2**i - 0.005 for i, gap in enumerate(gaps)), gaps
    (dead,) = await read_all(services.amqp_url, dead_queue)
    reason = str(dead.headers[DEAD_REASON_HEADER])
    assert f"failed {DELIVERY_LIMIT} times" in reason and "store is on fire" in reason
    assert (await bus.queue_state(queue)).messages == 0

    # The stream keeps flowing after the poison message.
    await bus.publish(CellSync(cell_id=cell, seq=2, sent_at=heartbeat(cell).sent_at))
    await asyncio.wait_for(synced.wait(), 15)
    assert len(attempts) == DELIVERY_LIMIT


async def test_a_handler_that_lost_a_race_is_handed_back_at_once_and_holds_up_no_one(
    services: Services, bus: RabbitBus
) -> None:
    """A write that kept losing races (TryAgain) goes back to its queue at once, not after the
    pause a failure gets (held for it, it would hold back the acks of every later delivery),
    and is dead-lettered at the delivery limit like any failure."""
    cell = new_cell_id()
    queue = await cell_queue(bus, cell, "heartbeat", "sync")
    tries: list[int] = []
    synced = asyncio.Event()
    bus.handler_retry_seconds = 60  # a failure's pause: none of it may be waited here

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        tries.append(delivery.delivery_count)
        raise TryAgain("the record kept changing")

    async def on_sync(msg: CellSync, delivery: Delivery) -> None:
        synced.set()

    await bus.consume(queue, [route(CellHeartbeat, on_heartbeat), route(CellSync, on_sync)])
    await bus.publish(heartbeat(cell))
    await bus.publish(CellSync(cell_id=cell, seq=2, sent_at=heartbeat(cell).sent_at))
    await asyncio.wait_for(synced.wait(), 15)
    dead_queue = dead_letter_name(queue)
    await eventually(lambda: _count_is(bus, dead_queue, 1), what="dead letter", timeout=15)
    assert len(tries) == DELIVERY_LIMIT
    (dead,) = await read_all(services.amqp_url, dead_queue)
    assert f"lost {DELIVERY_LIMIT} races" in str(dead.headers[DEAD_REASON_HEADER])


@pytest.mark.parametrize("quorum", [False, True], ids=["classic", "quorum"])
async def test_each_failing_delivery_gets_its_tries_while_others_go_through(
    services: Services, bus: RabbitBus, quorum: bool
) -> None:
    """A classic queue (a cell's commands) says only whether a delivery is a redelivery; the
    consumer counts the rest, so a failing command gets the same tries as on a quorum queue
    before it is rejected into the dead letter queue. On both, a delivery that goes through
    while another is held for its retry is acked without handing the held one back."""
    cell = new_cell_id()
    queue = f"test.{cell}"
    binding = Binding(CELLS_EXCHANGE, f"{cell}.heartbeat")
    await bus.declare(Topology((), consuming_queue(queue, binding, quorum=quorum)))
    bus.handler_retry_seconds = 0.05
    attempts: dict[int, list[int]] = {1: [], 2: []}
    handled = asyncio.Event()

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        attempts[msg.seq].append(delivery.delivery_count)
        # The first always fails; the second fails twice, then goes through.
        if msg.seq == 1 or len(attempts[2]) <= 2:
            raise RuntimeError("disk is full")
        handled.set()

    await bus.consume(queue, [route(CellHeartbeat, on_heartbeat)], reject_to_dead=True)
    await bus.publish(heartbeat(cell, seq=1))
    await bus.publish(heartbeat(cell, seq=2))
    dead_queue = dead_letter_name(queue)
    await eventually(lambda: _count_is(bus, dead_queue, 1), what="dead letter", timeout=15)
    await asyncio.wait_for(handled.wait(), 15)

    assert attempts == {1: list(range(DELIVERY_LIMIT)), 2: [0, 1, 2]}
    (dead,) = await read_all(services.amqp_url, dead_queue)
    assert json.loads(dead.body)["seq"] == 1
    # The one that went through was acked: nothing comes back when the consumer goes.
    await bus.close(drain_timeout=5)
    assert (await _queue_messages(services, queue)) == 0


async def test_a_failed_delivery_is_held_for_its_pause_and_handed_back_at_once_on_stop(
    services: Services, bus: RabbitBus
) -> None:
    """Through the pause the rest of the stream flows; a bus told to stop does not wait for the
    pause to end (or for its drain timeout): the delivery goes back to the queue, unharmed."""
    cell = new_cell_id()
    queue = await cell_queue(bus, cell, "heartbeat", "sync")
    bus.handler_retry_seconds = 60
    attempts: list[int] = []
    failed, synced = asyncio.Event(), asyncio.Event()

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        attempts.append(delivery.delivery_count)
        failed.set()
        raise RuntimeError("store is on fire")

    async def on_sync(msg: CellSync, delivery: Delivery) -> None:
        synced.set()

    await bus.consume(queue, [route(CellHeartbeat, on_heartbeat), route(CellSync, on_sync)])
    await bus.publish(heartbeat(cell))
    await asyncio.wait_for(failed.wait(), 15)
    await bus.publish(CellSync(cell_id=cell, seq=2, sent_at=heartbeat(cell).sent_at))
    await asyncio.wait_for(synced.wait(), 15)
    assert attempts == [0]  # still held: the pause is a minute

    assert await bus.stop_consuming(drain_timeout=20) is True
    assert attempts == [0]
    await eventually(lambda: _count_is(bus, queue, 1), what="the delivery back in its queue")
    (back,) = await read_all(services.amqp_url, queue)
    assert json.loads(back.body)["cell_id"] == cell
    assert await read_all(services.amqp_url, dead_letter_name(queue)) == []


async def test_forged_user_id_is_refused_and_the_next_publish_waits_for_the_channel(
    bus: RabbitBus, other_bus: RabbitBus
) -> None:
    # The broker closes the publishing channel over a forged user_id. The next publish comes
    # while it reopens, as after a reconnect when a consumer's channel is back before the
    # publishing one and a handler replies at once: that publish used to fail, and its
    # delivery was retried until dead-lettered within milliseconds. It now waits for the channel.
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    seen: list[tuple[int, str | None]] = []
    got = asyncio.Event()

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        seen.append((msg.seq, delivery.user_id))
        got.set()

    await other_bus.consume(queue, [route(CellHeartbeat, on_heartbeat)])
    with pytest.raises(PublishRefused, match=r"PRECONDITION_FAILED|user_id"):
        await bus.publish(heartbeat(cell), user_id="someone-else")
    assert bus.publisher.channel.is_closed, "the broker closed the publishing channel; reopening"
    assert bus.is_connected
    await bus.publish(heartbeat(cell, seq=2))
    await asyncio.wait_for(got.wait(), 15)
    assert seen == [(2, bus.user)]


class Seen:
    """The sequence numbers of the heartbeats a consumer handled, and whether ``until`` came."""

    def __init__(self, until: int) -> None:
        self.until = until
        self.seqs: list[int] = []
        self.reached = asyncio.Event()

    async def on_heartbeat(self, msg: CellHeartbeat, delivery: Delivery) -> None:
        self.seqs.append(msg.seq)
        if msg.seq == self.until:
            self.reached.set()


async def test_consumer_comes_back_after_the_broker_closes_its_connection(
    services: Services, bus: RabbitBus, other_bus: RabbitBus
) -> None:
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    seen = Seen(until=2)
    await other_bus.consume(queue, [route(CellHeartbeat, seen.on_heartbeat)])
    assert (await bus.queue_state(queue)).consumers == 1

    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    # Seen through the bus's own reconnect hook: polling for the moment it is disconnected
    # misses a reconnect quicker than the poll.
    other_bus.on_reconnect(on_reconnect)
    conn_name = await eventually(
        lambda: _connection_of(services, other_bus), what="connection listed", timeout=15
    )
    await services.api.close_connection(conn_name, "test: force close")
    await asyncio.wait_for(reconnected.wait(), 30)

    # The proof is the consumer, not only the connection: count it at the broker.
    await eventually(lambda: _consumers_are(bus, queue, 1), what="consumer restored", timeout=20)
    await bus.publish(heartbeat(cell, seq=2))
    await asyncio.wait_for(seen.reached.wait(), 10)
    assert seen.seqs == [2]


async def test_consumer_comes_back_when_its_deleted_queue_is_declared_again(
    bus: RabbitBus, other_bus: RabbitBus
) -> None:
    """Deleting a classic queue (a cell's command queue is one) makes the broker cancel its
    consumers; the bus waits for the queue and consumes it again, without a reconnect. (RabbitMQ
    3.10 sends no cancel when a quorum queue is deleted: its consumers learn nothing.)"""
    cell = new_cell_id()
    queue = f"test.{cell}"
    topology = Topology((), consuming_queue(queue, Binding(CELLS_EXCHANGE, f"{cell}.heartbeat"),
                                            quorum=False))  # fmt: skip
    await bus.declare(topology)
    seen = Seen(until=2)
    await other_bus.consume(queue, [route(CellHeartbeat, seen.on_heartbeat)])
    await bus.delete_queue(queue)
    await bus.declare(topology)

    await eventually(lambda: _consumers_are(bus, queue, 1), what="consumer restored", timeout=20)
    assert other_bus.is_connected
    await bus.publish(heartbeat(cell, seq=2))
    await asyncio.wait_for(seen.reached.wait(), 10)
    assert seen.seqs == [2]


async def _connection_of(services: Services, bus: RabbitBus) -> str | None:
    """The broker's name for ``bus``'s connection (the management API lists it with a lag)."""
    for conn in await services.api.connections():
        props = conn.get("client_properties", {})
        if props.get("connection_name") == bus.name and conn["vhost"] == services.vhost:
            return str(conn["name"])
    return None


async def _consumers_are(bus: RabbitBus, queue: str, n: int) -> bool:
    return (await bus.queue_state(queue)).consumers == n


class Doubled(Response):
    n: int


class Double(Request[Doubled]):
    n: int


class Broken(Request[Doubled]):
    pass


# Methods of this test only: not registered in the contract.
Double.service, Double.method = "flags", "double"
Broken.service, Broken.method = "flags", "broken"


async def test_request_reply_many_in_flight(bus: RabbitBus, other_bus: RabbitBus) -> None:
    async def double(req: Double, delivery: Delivery) -> Doubled:
        await asyncio.sleep(0.01)
        return Doubled(n=req.n * 2)

    async def broken(req: Broken, delivery: Delivery) -> Doubled:
        raise RpcFailure("not_found", "cell 'zz' does not exist")

    await other_bus.serve("flags", [route(Double, double), route(Broken, broken)])
    results = await asyncio.gather(
        *(bus.request("flags", "double", {"n": i}, timeout=10) for i in range(50))
    )
    assert [r["n"] for r in results] == [i * 2 for i in range(50)]

    with pytest.raises(RemoteError) as caught:
        await bus.request("flags", "broken")
    assert caught.value.code == "not_found" and "zz" in caught.value.message

    with pytest.raises(RemoteError, match="no method 'nope'"):
        await bus.request("flags", "nope")


class Halved(Response):
    half: int


class Misread(Request[Halved]):
    n: int


Misread.service, Misread.method = "flags", "double"


async def test_a_typed_call_reads_its_answer_as_the_response_or_says_what_is_wrong(
    bus: RabbitBus, other_bus: RabbitBus
) -> None:
    async def double(req: Double, delivery: Delivery) -> Doubled:
        return Doubled(n=req.n * 2)

    async def broken(req: Broken, delivery: Delivery) -> Doubled:
        raise RpcFailure("not_found", "cell 'zz' does not exist")

    await other_bus.serve("flags", [route(Double, double), route(Broken, broken)])
    assert await bus.call(Double(n=21), timeout=10) == Doubled(n=42)

    # An error answer has no result of the response type: it is read as the error it is.
    with pytest.raises(RemoteError) as caught:
        await bus.call(Broken(), timeout=10)
    assert caught.value.code == "not_found"

    # An answer that is not the response type names the field, from within the result.
    with pytest.raises(BusError, match=r"answered 'double' with an unexpected result: half: "):
        await bus.call(Misread(n=1), timeout=10)


class Peek(Request[Doubled]):
    n: int


class Poke(Request[Doubled]):
    n: int


async def test_a_read_the_broker_nacks_is_asked_again_a_write_is_not(
    bus: RabbitBus, other_bus: RabbitBus, services: Services
) -> None:
    """While the service's queue refuses publishes (as a quorum queue between leaders does, here
    by a policy rejecting every publish), a read is sent again until it is taken and answered;
    a write fails at once with the nack."""
    # A name of the tests' own ("test."): the queue is left in the session's vhost, where every
    # queue but the tests' own must be under the storage bounds (test_cell_security).
    service = f"test.nacking{new_cell_id()}"
    Peek.service = Poke.service = service
    Peek.method, Poke.method, Peek.read_only = "peek", "poke", True
    queue = rpc_queue(service)
    await bus.declare(Topology((), consuming_queue(queue, Binding(RPC_EXCHANGE, service),
                                                   quorum=False)))  # fmt: skip

    async def answer(req: Peek | Poke, delivery: Delivery) -> Doubled:
        return Doubled(n=req.n * 2)

    await other_bus.serve(service, [route(Peek, answer), route(Poke, answer)])
    policy = f"/policies/{quote(services.vhost, safe='')}/refuse-{service}"
    await services.api.call("PUT", policy, {
        "pattern": f"^{queue}$", "apply-to": "queues",
        "definition": {"max-length": 0, "overflow": "reject-publish"}})  # fmt: skip
    refused = bus.publisher.metrics.published.labels(RpcRequest.wire_name, "refused")

    async def write_nacked() -> bool:
        try:
            await bus.call(Poke(n=1), timeout=30)
        except PublishNacked:
            return True
        return False  # answered: the policy is not in force yet

    await eventually(write_nacked, timeout=20, interval=0.1, what="the policy refusing publishes")
    before = refused._value.get()
    started = asyncio.get_running_loop().time()
    with pytest.raises(PublishNacked):
        await bus.call(Poke(n=1), timeout=30)
    assert refused._value.get() == before + 1, "a write is sent once"
    assert asyncio.get_running_loop().time() - started < 15, "a write does not wait its timeout"

    read = asyncio.create_task(bus.call(Peek(n=21), timeout=60))
    await eventually(lambda: refused._value.get() >= before + 3, timeout=20,
                     what="the read sent again after nacks")  # fmt: skip
    assert not read.done()
    await services.api.call("DELETE", policy)
    assert (await asyncio.wait_for(read, 50)).n == 42


async def test_request_to_a_service_that_is_not_running_times_out_naming_it(
    bus: RabbitBus,
) -> None:
    with pytest.raises(RequestTimeout, match="'infra_compliance'"):
        await bus.request("infra_compliance", "status", timeout=0.5)


async def test_queue_exists_answers_on_one_channel_after_a_missing_queue_too(
    bus: RabbitBus,
) -> None:
    """A missing queue makes the broker close the channel that asked: the next question gets a
    channel again, and concurrent questions are each answered."""
    queue = await cell_queue(bus, new_cell_id())
    missing = f"no-such-queue-{new_cell_id()}"
    answers = await asyncio.gather(*(bus.queue_exists(q) for q in [queue, missing] * 5))
    assert answers == [True, False] * 5
    await bus.delete_queue(queue)
    assert await bus.queue_exists(queue) is False
    assert await bus.queue_exists("registry.cells") is True


async def test_declaring_the_topology_twice_changes_nothing(bus: RabbitBus) -> None:
    before = await bus.queue_state("registry.cells")
    await bus.declare(control_plane())
    await bus.declare(control_plane())
    assert await bus.queue_state("registry.cells") == before


async def test_a_retired_binding_is_removed_when_the_topology_is_declared(
    services: Services, bus: RabbitBus
) -> None:
    """Declaring a queue never drops a binding by itself: one the topology lists as retired is
    unbound, the others stay, and declaring again (nothing left to unbind) is no error."""
    exchange = ExchangeSpec(f"test.retired.{uuid.uuid4().hex[:8]}", "topic")
    queue = f"{exchange.name}.q"
    kept, old = Binding(exchange.name, "*.heartbeat"), Binding(exchange.name, "*.upgrade")
    await bus.declare(Topology((exchange,), (QueueSpec(queue, (kept, old), quorum=False),)))
    await raw_publish(services.amqp_url, exchange.name, "a.upgrade", b"{}")
    now = Topology((exchange,), (QueueSpec(queue, (kept,), quorum=False, retired=(old,)),))
    await bus.declare(now)
    await bus.declare(now)
    with pytest.raises(aio_pika.exceptions.DeliveryError):  # returned: routed nowhere
        await raw_publish(services.amqp_url, exchange.name, "a.upgrade", b"{}")
    await raw_publish(services.amqp_url, exchange.name, "a.heartbeat", b"{}")
    try:
        assert (await bus.queue_state(queue)).messages == 2
    finally:
        await bus.delete_queue(queue)


async def test_acks_never_cover_a_handler_that_is_still_running(
    services: Services, bus: RabbitBus, other_bus: RabbitBus
) -> None:
    """Finished deliveries are acked together, but never past one still in progress: if the
    connection dies while an early message is being handled, that message comes back."""
    cell = new_cell_id()
    queue = await cell_queue(bus, cell)
    release = asyncio.Event()
    handled: list[tuple[int, bool]] = []

    async def on_heartbeat(msg: CellHeartbeat, delivery: Delivery) -> None:
        if msg.seq == 1 and not delivery.redelivered:
            await release.wait()  # stuck until the connection dies
        handled.append((msg.seq, delivery.redelivered))

    await other_bus.consume(queue, [route(CellHeartbeat, on_heartbeat)])
    for seq in range(1, 6):
        await bus.publish(heartbeat(cell, seq=seq))
    await eventually(lambda: len(handled) == 4, what="the four quick messages handled")

    name = await eventually(lambda: _connection_of(services, other_bus), timeout=15)
    await services.api.close_connection(name, "test: crash")
    try:
        await eventually(
            lambda: (1, True) in handled, timeout=20, what="the unfinished message redelivered"
        )
    finally:
        release.set()
    assert {seq for seq, _ in handled} == {1, 2, 3, 4, 5}


async def test_a_cluster_url_connects_to_a_node_that_answers(services: Services) -> None:
    """Of a cluster's URLs, a node that refuses is skipped: the bus connects to the next."""
    dead = services.amqp_url.replace(f":{urlsplit(services.amqp_url).port}/", f":{free_port()}/")
    setting = f"{dead},{services.amqp_url}"
    for _ in range(3):  # whichever node it starts with (a random one)
        bus = await RabbitBus.connect(setting, name="cluster-url", give_up_after=10)
        try:
            assert bus.is_connected
            assert bus.node == f"127.0.0.1:{urlsplit(services.amqp_url).port}"
        finally:
            await bus.close(drain_timeout=1)
