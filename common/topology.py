"""The broker objects the control plane declares: exchanges, service queues with their dead
letter queues, and each cell's command queue. Plain data; ``RabbitBus.declare`` applies it, and
declaring the same objects with the same arguments twice changes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from common.messages import (
    BROADCAST_EXCHANGE,
    CELLS_EXCHANGE,
    COMMANDS_EXCHANGE,
    DLX_EXCHANGE,
    EVENTS_EXCHANGE,
    RPC_EXCHANGE,
    command_queue,
    rpc_queue,
)

# A handler that fails this many times in a row is dead-lettered. Five covers a restart or a
# short Redis outage; more would only delay the operator seeing a poison message.
DELIVERY_LIMIT = 5


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: str  # "topic" | "direct"


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    bindings: tuple[Binding, ...] = ()
    # Quorum queues replicate and enforce x-delivery-limit. Cells' command queues are classic:
    # one Raft group per cell would not fit a large fleet (see command_queue_spec).
    quorum: bool = True
    dead_letter_queue: str | None = field(default=None)
    delivery_limit: int | None = DELIVERY_LIMIT
    # Bindings an earlier version declared and this one removes: declaring a queue never drops
    # a binding by itself, so a deployment that upgrades would keep routing there.
    retired: tuple[Binding, ...] = ()
    # A classic queue's storage version (None: the broker's default; RabbitMQ 4.3 has only 2).
    classic_version: int | None = None

    def arguments(self) -> dict[str, str | int]:
        args: dict[str, str | int] = {}
        if self.quorum:
            args["x-queue-type"] = "quorum"
            if self.delivery_limit is not None:
                args["x-delivery-limit"] = self.delivery_limit
        else:
            args["x-queue-type"] = "classic"
            if self.classic_version is not None:
                args["x-queue-version"] = self.classic_version
        if self.dead_letter_queue:
            args["x-dead-letter-exchange"] = DLX_EXCHANGE
            args["x-dead-letter-routing-key"] = self.dead_letter_queue
            if self.quorum:
                # Without at-least-once a quorum queue may drop a dead letter if the dead letter
                # queue is unavailable; at-least-once requires reject-publish overflow.
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
        return args


# The broker refuses a body larger than this (rabbitmq.conf ``max_message_size``; its default,
# 128 MiB, let one cell put 128 MiB into a queue per publish). The largest legitimate message is
# an operator's page of cells (MAX_PAGE of about 1.5 KiB each); what a cell sends is refused by
# the services past 256 KiB (common/bus/consume.py). Every deployment sets it: compose's
# rabbitmq.conf, scripts/ensure-services.sh for make dev and make test, the tests' own brokers.
BROKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A broker policy on queues. Only one policy applies to a queue (the highest priority that
    matches), so these patterns never overlap."""

    name: str
    pattern: str
    definition: dict[str, str | int]


# What bounds the broker's storage whatever the cells send: every queue the control plane
# declares matches one of these. The registry applies them at start through the management API
# (so make dev, the tests and any broker get them), compose's definitions hold them too.
POLICIES = (
    # A cell that never consumes costs the broker this much at most; a publish past it is
    # refused to its publisher (visibly), never silently dropped.
    PolicySpec(
        "cell-commands",
        r"^cell\..+\.commands$",
        {"max-length": 10_000, "max-length-bytes": 16 * _MiB, "overflow": "reject-publish"},
    ),
    # Dead letters are for an operator to read: past the bound the oldest go, so one cell's
    # flood of refused messages cannot fill the disk (and a dead letter is never refused,
    # which would hold it in the queue it left).
    PolicySpec(
        "dead-letters",
        r"\.dead$",
        {"max-length": 100_000, "max-length-bytes": 256 * _MiB, "overflow": "drop-head"},
    ),
    # A service that is down keeps its backlog up to this; past it the broker refuses new
    # messages to their publisher (the queues' reject-publish), and agents send again later.
    PolicySpec(
        "service-queues",
        r"^(registry|rollout|flags|infra_compliance)\.(cells|events|rpc)$",
        {"max-length-bytes": 1024 * _MiB},
    ),
)


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]

    def fingerprint(self) -> str:
        """Changes whenever anything declared changes (a binding added, an argument): what was
        declared with an older one is declared again."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


EXCHANGES = (
    ExchangeSpec(CELLS_EXCHANGE, "topic"),
    ExchangeSpec(EVENTS_EXCHANGE, "topic"),
    ExchangeSpec(COMMANDS_EXCHANGE, "direct"),
    ExchangeSpec(RPC_EXCHANGE, "direct"),
    ExchangeSpec(DLX_EXCHANGE, "direct"),
    ExchangeSpec(BROADCAST_EXCHANGE, "fanout"),
)


def dead_letter_name(queue: str) -> str:
    return f"{queue}.dead"


def consuming_queue(
    name: str, *bindings: Binding, quorum: bool = True, retired: tuple[Binding, ...] = ()
) -> tuple[QueueSpec, ...]:
    """A consuming queue and the ``.dead`` queue it dead-letters into."""
    dead = dead_letter_name(name)
    return (
        QueueSpec(name, bindings, quorum=quorum, dead_letter_queue=dead, retired=retired),
        QueueSpec(dead, (Binding(DLX_EXCHANGE, dead),), quorum=quorum, delivery_limit=None),
    )


def _cells(*kinds: str) -> tuple[Binding, ...]:
    return tuple(Binding(CELLS_EXCHANGE, f"*.{kind}") for kind in kinds)


def _events(*keys: str) -> tuple[Binding, ...]:
    return tuple(Binding(EVENTS_EXCHANGE, key) for key in keys)


def _rpc(service: str) -> tuple[QueueSpec, ...]:
    return consuming_queue(rpc_queue(service), Binding(RPC_EXCHANGE, service))


# What each service consumes. The registry owns what cells report about themselves, except
# upgrade progress: rollout follows upgrades and answers a cell's sync with its desired state;
# flags answers sync with a snapshot and follows upgrades (the installed release is a flag
# attribute); every service keeps the cell facts it needs from the registry's events. The
# registry hears of flag changes to tell which cells hold an old snapshot. The registry keeps
# the operators; the others keep the roster it publishes, to authorise requests.
SERVICE_QUEUES: dict[str, tuple[QueueSpec, ...]] = {
    "registry": (
        *consuming_queue(
            "registry.cells",
            *_cells("register", "heartbeat", "maintenance", "debug-access"),
            # The registry once took upgrade reports only to check their sender, which rollout
            # and flags check too: four deliveries a cell per release for nothing.
            retired=_cells("upgrade"),
        ),
        *consuming_queue(
            "registry.events",
            *_events("flags.changed", "infra.compliance-changed", "credentials.confirmed"),
        ),
        *_rpc("registry"),
    ),
    "rollout": (
        *consuming_queue("rollout.cells", *_cells("upgrade", "sync")),
        *consuming_queue(
            "rollout.events", *_events("cell.#", "infra.compliance-changed", "operators.roster")
        ),
        *_rpc("rollout"),
    ),
    "flags": (
        *consuming_queue("flags.cells", *_cells("sync", "upgrade")),
        *consuming_queue(
            "flags.events", *_events("cell.#", "infra.compliance-changed", "operators.roster")
        ),
        *_rpc("flags"),
    ),
    "infra_compliance": (
        *consuming_queue("infra_compliance.events", *_events("cell.#", "operators.roster")),
        *_rpc("infra_compliance"),
    ),
}

SERVICES = tuple(SERVICE_QUEUES)


def control_plane() -> Topology:
    """Every static object: what each service declares at start (all of it, so a request to a
    service that is down waits in its queue instead of being unroutable)."""
    queues = tuple(q for service in SERVICES for q in SERVICE_QUEUES[service])
    return Topology(EXCHANGES, queues)


# One shared dead letter queue for all cells' commands: a queue per cell for dead letters would
# double the number of queues for a case that should never happen.
CELL_COMMANDS_DEAD = "cell.commands.dead"


# What a cell's command queue is (SUBSTRATE_CELL_QUEUES; docs/operating.md says which to use on
# which broker): classic with the broker's default storage version (1 on RabbitMQ 3.10-3.12),
# classic with version 2 (the only one RabbitMQ 4.3 has), or quorum (on a cluster).
CellQueues = Literal["classic", "classic-v2", "quorum"]


def cell_commands(cell_id: str, *, queues: CellQueues = "classic") -> Topology:
    """A cell's command queue, declared by the control plane when the cell is created.

    Classic by default: one Raft group per cell costs a cluster memory and work for every cell.
    On a cluster (``SUBSTRATE_CELL_QUEUES=quorum``) a classic queue lives on one node and is
    unreachable while that node is down, so there each cell's queue is a quorum queue too. A
    queue's type cannot change once declared: choose before the first cell is created.
    ``classic`` declares no storage version, so the same setting runs on RabbitMQ 3.x (where
    the default is version 1) and on 4.3 (which refuses version 1 and has only 2).
    """
    quorum = queues == "quorum"
    version = 2 if queues == "classic-v2" else None
    queue = QueueSpec(
        command_queue(cell_id),
        # Its own commands, and what goes to every cell (a cell created before the broadcast
        # exchange existed gets the binding when it next registers: the registry declares its
        # queue again then).
        (Binding(COMMANDS_EXCHANGE, cell_id), Binding(BROADCAST_EXCHANGE, "")),
        quorum=quorum,
        dead_letter_queue=CELL_COMMANDS_DEAD,
        delivery_limit=None,
        classic_version=version,
    )
    dead = QueueSpec(
        CELL_COMMANDS_DEAD,
        (Binding(DLX_EXCHANGE, CELL_COMMANDS_DEAD),),
        quorum=quorum,
        delivery_limit=None,
        classic_version=version,
    )
    return Topology((), (dead, queue))
