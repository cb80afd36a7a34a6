"""The wire contract: every message on the bus, its versioned name, and where it is routed.

A model changes only by adding optional fields (``extra="ignore"`` lets an older consumer read a
newer producer's message); a breaking change is a new ``vN+1`` class consumed beside the old one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from common.fields import (
    CellId,
    Name,
    PublicKey,
    Region,
    RoleArn,
    Sealed,
    StackName,
    Text,
    WireInt,
    clean_text,
)
from common.health import HealthSpec, Verdict
from common.releases import Release
from common.vocabulary import (
    ComplianceState,
    DebugAccessAction,
    RolloutState,
    Stage,
    SyncReason,
    UpgradePhase,
)

# ---------------------------------------------------------------------------------------------
# Names that both sides must agree on.

CELLS_EXCHANGE = "substrate.cells"
EVENTS_EXCHANGE = "substrate.events"
COMMANDS_EXCHANGE = "substrate.commands"
RPC_EXCHANGE = "substrate.rpc"
DLX_EXCHANGE = "substrate.dlx"
# Fanout, bound to every cell's command queue: one publish reaches the whole fleet.
BROADCAST_EXCHANGE = "substrate.broadcast"


def command_queue(cell_id: str) -> str:
    """The queue a cell consumes its commands from; declared by the control plane."""
    return f"cell.{cell_id}.commands"


def rpc_queue(service: str) -> str:
    return f"{service}.rpc"


# ---------------------------------------------------------------------------------------------
# The base class and the registry of wire names.


class Message(BaseModel):
    """A message on the bus. ``wire_name`` is its AMQP ``type`` property."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    wire_name: ClassVar[str]
    exchange: ClassVar[str]

    def routing_key(self) -> str:
        raise NotImplementedError


MESSAGES: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def wire(name: str) -> Callable[[M], M]:
    """Register a message class under its versioned wire name."""

    def register(cls: M) -> M:
        if name in MESSAGES:
            raise ValueError(f"wire name {name!r} registered twice")
        cls.wire_name = name
        MESSAGES[name] = cls
        return cls

    return register


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the bus knows about a delivered message besides its body.

    Handlers get this instead of the broker's message object so they never touch aio-pika.
    ``user_id`` is the broker-authenticated publisher: the broker refuses a forged one, but a
    message with none is not checked at all, so consumers must insist on it.
    """

    message_id: str | None
    user_id: str | None
    routing_key: str
    redelivered: bool
    delivery_count: int
    correlation_id: str | None = None
    reply_to: str | None = None


# Releases (common/releases.py) are carried by events and commands, so they are in the contract.


# ---------------------------------------------------------------------------------------------
# Cell reports: published by a cell on substrate.cells as ``<cell_id>.<kind>``.


class CellReport(Message):
    exchange: ClassVar[str] = CELLS_EXCHANGE
    kind: ClassVar[str]

    cell_id: CellId
    # Per-cell sequence number: consumers order reports by it, never by arrival or the cell's clock.
    seq: WireInt
    sent_at: AwareDatetime

    def routing_key(self) -> str:
        return f"{self.cell_id}.{self.kind}"


@wire("cell.register.v1")
class CellRegister(CellReport):
    kind: ClassVar[str] = "register"

    agent_version: Name
    aws_account_id: Annotated[str, Field(pattern=r"^[0-9]{12}$")]
    region: Region
    stack_name: StackName | None = None
    template_version: Name | None = None
    installed_release: Name | None = None
    # Made once with the agent's state directory. A registration from a new incarnation (a
    # re-bootstrapped cell) starts a new sequence; within one, ``seq`` only grows.
    incarnation: Name | None = None
    # The agent's public key (common/sealing.py), bound at the first registration that has
    # one: a rotated secret is sealed to it.
    rotation_key: PublicKey | None = None
    # Whether the agent found its command queue missing. None: an agent that does not look
    # (an older one), so the registry looks on every registration. False: the agent looks
    # after registering and registers again with True when the queue is missing, so the
    # registry need not ask the broker each time (one passive declare less per registration).
    queue_missing: bool | None = None


@wire("cell.heartbeat.v1")
class CellHeartbeat(CellReport):
    kind: ClassVar[str] = "heartbeat"

    agent_version: Name
    installed_release: Name | None = None
    applied_generation: WireInt | None = None
    maintenance: bool = False
    template_version: Name | None = None
    flags_snapshot_version: WireInt | None = None
    # The id (never the secret) of the credentials the agent holds, so the registry knows a
    # rotation reached it.
    credential_id: Name | None = None


@wire("cell.upgrade.v1")
class CellUpgrade(CellReport):
    kind: ClassVar[str] = "upgrade"

    generation: WireInt
    release_version: Name | None
    phase: UpgradePhase
    error: Text | None = None
    # After a ``succeeded`` (or a ``rolled_back`` it caused): the health checks' verdict, the
    # check that decided it, and in ``error`` what that check saw against what it wanted.
    verdict: Verdict | None = None
    check: Name | None = None
    # What the cell runs after this report (a rollback runs the previous release again).
    installed_release: Name | None = None


@wire("cell.maintenance.v1")
class CellMaintenance(CellReport):
    kind: ClassVar[str] = "maintenance"

    enabled: bool
    enabled_until: AwareDatetime | None = None
    reason: Text = ""


@wire("cell.debug-access.v1")
class CellDebugAccess(CellReport):
    kind: ClassVar[str] = "debug-access"

    action: DebugAccessAction
    role_arn: RoleArn
    expires_at: AwareDatetime | None = None
    reason: Text = ""
    granted_by: Annotated[str, clean_text(256)] = ""
    # When it happened (a report can wait in the cell while the control plane is away).
    occurred_at: AwareDatetime | None = None


@wire("cell.sync.v1")
class CellSync(CellReport):
    kind: ClassVar[str] = "sync"

    reason: SyncReason = "periodic"
    applied_generation: WireInt | None = None
    flags_snapshot_version: WireInt | None = None
    # With reason "defer": the customer's deferral (common/deferrals.py), or its cancellation.
    defer_id: Name | None = None
    defer_until: AwareDatetime | None = None
    defer_reason: Annotated[str, clean_text(300)] = ""
    defer_cancel: bool = False


def sender_problem(msg: CellReport, delivery: Delivery) -> tuple[str, str] | None:
    """Why a cell report must be refused, as (reason, message), or None. A cell may speak only
    for itself: the broker-checked user_id, the routing key and the body must name the same
    cell. The broker checks a user_id only when one is set, so a missing one is refused here."""
    if not delivery.user_id:
        return "missing_user_id", "message has no user_id"
    if delivery.user_id != msg.cell_id:
        return "user_mismatch", f"user {delivery.user_id!r} sent a message for {msg.cell_id!r}"
    if delivery.routing_key != msg.routing_key():
        return (
            "routing_key_mismatch",
            f"routing key {delivery.routing_key!r} does not match {msg.routing_key()!r}",
        )
    return None


CELL_REPORT_KINDS = tuple(cls.kind for cls in MESSAGES.values() if issubclass(cls, CellReport))

# ---------------------------------------------------------------------------------------------
# Control-plane events: published by services on substrate.events as ``<domain>.<event>``.


class Event(Message):
    exchange: ClassVar[str] = EVENTS_EXCHANGE
    event_key: ClassVar[str]

    at: AwareDatetime

    def routing_key(self) -> str:
        return self.event_key


@wire("cell.created.v1")
class CellCreated(Event):
    event_key: ClassVar[str] = "cell.created"

    cell_id: CellId
    stage: Stage
    region: str
    org: str


@wire("cell.registered.v1")
class CellRegistered(Event):
    event_key: ClassVar[str] = "cell.registered"

    cell_id: CellId
    stage: Stage
    region: str
    org: str
    aws_account_id: str
    agent_version: str
    installed_release: str | None = None
    template_version: str | None = None
    # A new incarnation (a re-bootstrapped cell) has nothing of what the last one was sent.
    incarnation: str | None = None


@wire("cell.registration-refused.v1")
class CellRegistrationRefused(Event):
    event_key: ClassVar[str] = "cell.registration-refused"

    cell_id: str
    reason: str
    aws_account_id: str | None = None


@wire("cell.offline.v1")
class CellOffline(Event):
    event_key: ClassVar[str] = "cell.offline"

    cell_id: CellId
    last_heartbeat_at: AwareDatetime | None = None


@wire("cell.online.v1")
class CellOnline(Event):
    event_key: ClassVar[str] = "cell.online"

    cell_id: CellId


@wire("cell.template-changed.v1")
class CellTemplateChanged(Event):
    """A cell's heartbeat reported another infrastructure template version than before (the
    customer applied an update to the cell's stack)."""

    event_key: ClassVar[str] = "cell.template-changed"

    cell_id: CellId
    template_version: str | None
    previous_version: str | None = None


@wire("credentials.confirmed.v1")
class CredentialsConfirmed(Event):
    """A cell's agent confirmed its rotated credentials: the registry closes every connection
    opened with the old secret. Not a ``cell.*`` event: only the registry acts on it."""

    event_key: ClassVar[str] = "credentials.confirmed"

    cell_id: CellId
    credential_id: str


@wire("cell.decommissioned.v1")
class CellDecommissioned(Event):
    event_key: ClassVar[str] = "cell.decommissioned"

    cell_id: CellId


@wire("release.published.v1")
class ReleasePublished(Event):
    event_key: ClassVar[str] = "release.published"

    release: Release


@wire("rollout.progressed.v1")
class RolloutProgressed(Event):
    event_key: ClassVar[str] = "rollout.progressed"

    version: str
    state: RolloutState
    stage: Stage | None = None
    wave: WireInt | None = None
    counts: dict[str, WireInt] = Field(default_factory=dict)


class CellFailure(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    cell_id: str
    error: str


@wire("rollout.halted.v1")
class RolloutHalted(Event):
    event_key: ClassVar[str] = "rollout.halted"

    version: str
    stage: Stage
    wave: WireInt | None = None
    reason: str
    failures: tuple[CellFailure, ...] = ()


@wire("rollout.completed.v1")
class RolloutCompleted(Event):
    event_key: ClassVar[str] = "rollout.completed"

    version: str


@wire("flags.changed.v1")
class FlagsChanged(Event):
    event_key: ClassVar[str] = "flags.changed"

    key: str
    snapshot_version: WireInt
    actor: str
    deleted: bool = False


@wire("infra.template-published.v1")
class InfraTemplatePublished(Event):
    event_key: ClassVar[str] = "infra.template-published"

    version: str
    location: str
    deadline: AwareDatetime
    grace_seconds: float | None = None


@wire("infra.reminder.v1")
class InfraReminder(Event):
    """A cell on an older infrastructure template is reminded of its deadline (also sent to its
    organisation's SNS topic)."""

    event_key: ClassVar[str] = "infra.reminder"

    cell_id: CellId
    org: str
    required_version: str
    deadline: AwareDatetime
    location: str
    # Which reminder this is (1 is the first), of how many before the deadline.
    reminder: WireInt
    of: WireInt


@wire("infra.compliance-changed.v1")
class InfraComplianceChanged(Event):
    event_key: ClassVar[str] = "infra.compliance-changed"

    cell_id: CellId
    status: ComplianceState
    template_version: str | None = None
    required_version: str | None = None
    deadline: AwareDatetime | None = None


# ---------------------------------------------------------------------------------------------
# Commands: published by services on substrate.commands with the cell id as routing key.


class Command(Message):
    exchange: ClassVar[str] = COMMANDS_EXCHANGE

    cell_id: CellId
    issued_at: AwareDatetime

    def routing_key(self) -> str:
        return self.cell_id


@wire("command.desired-state.v1")
class DesiredState(Command):
    """The full spec for a cell. Level-triggered: the newest generation wins."""

    generation: WireInt
    release: Release | None
    # What to check after applying it, and for how long (None: nothing).
    health: HealthSpec | None = None


@wire("command.flags-snapshot.v1")
class FlagsSnapshot(Command):
    version: WireInt
    # The flag definitions; their schema is owned by the flags engine (common.flags.Flag).
    flags: tuple[dict[str, Any], ...] = ()
    # The cell's attributes as the control plane knows them (stage, region, org), which the
    # agent cannot know by itself; it adds its id, installed release and agent version.
    cell: dict[str, str] = Field(default_factory=dict)


@wire("command.flags-broadcast.v1")
class FlagsBroadcast(Message):
    """A new flags snapshot for every cell at once, published once and fanned out by the broker
    to every command queue. It carries no cell's attributes: each agent evaluates with those of
    the last snapshot addressed to it (FlagsSnapshot, on sync)."""

    exchange: ClassVar[str] = BROADCAST_EXCHANGE

    issued_at: AwareDatetime
    version: WireInt
    flags: tuple[dict[str, Any], ...] = ()

    def routing_key(self) -> str:
        return ""


@wire("command.infra-required.v1")
class InfraRequired(Command):
    """What the control plane requires of the cell's infrastructure: the template version to
    apply, where it is, and by when (``status`` compliant: nothing is required)."""

    status: ComplianceState
    required_version: str | None = None
    location: str | None = None
    deadline: AwareDatetime | None = None


@wire("command.rotate-credentials.v1")
class RotateCredentials(Command):
    """The new secret in the clear: what a control plane before sealing sent. Agents still
    take it; the control plane sends only the sealed one."""

    credential_id: str
    password: str


@wire("command.rotate-credentials.v2")
class SealedRotateCredentials(Command):
    """The new secret sealed to the key the agent registered (common/sealing.py), with
    ``<cell_id>:<credential_id>`` as the associated data: a reader of the queue learns nothing."""

    credential_id: Name
    sealed_password: Sealed

    def sealing_context(self) -> str:
        return sealing_context(self.cell_id, self.credential_id)


def sealing_context(cell_id: str, credential_id: str) -> str:
    return f"{cell_id}:{credential_id}"


# ---------------------------------------------------------------------------------------------
# Request/reply envelopes on substrate.rpc (routing key = service name).


class RpcErrorBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    code: str
    message: str


@wire("rpc.request.v1")
class RpcRequest(Message):
    exchange: ClassVar[str] = RPC_EXCHANGE

    service: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    def routing_key(self) -> str:
        return self.service


@wire("rpc.reply.v1")
class RpcReply(Message):
    exchange: ClassVar[str] = ""

    ok: bool
    result: Any = None
    error: RpcErrorBody | None = None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every message, keyed by wire name."""
    names = sorted(MESSAGES)
    _, schema = models_json_schema(
        [(MESSAGES[name], "validation") for name in names],
        title="Substrate wire contract",
    )
    schema["messages"] = {
        name: {
            "$ref": f"#/$defs/{MESSAGES[name].__name__}",
            "exchange": MESSAGES[name].exchange,
        }
        for name in names
    }
    return schema
