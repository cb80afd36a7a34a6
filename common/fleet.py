"""One view of the fleet for the services other than the registry: what each cell is (stage,
region, org), whether it is reachable, what it runs and whether it is held for its
infrastructure, kept from the registry's ``cell.*`` events, the cells' upgrade reports and the
compliance service's events. Rollout and flags (and infra_compliance) each keep this view under
their own key prefix, through the same handlers, ordering rule and encoding.

The ordering rule: each source's facts are applied in that source's own order, and a fact that
is older than the one recorded from the same source is dropped. The registry's events are
ordered by their time (the registry's clock); a cell's upgrade reports by generation (the cell's
own order); compliance events by their time. Events can arrive twice or out of order; a
decommissioned cell stays decommissioned.

Redis: ``<prefix>fleet`` is a hash of cell id -> the cell as a JSON array (FIELDS, in order):
one HGETALL reads the whole fleet, and a change is one guarded write of one field. A view kept
``with_targets`` (flags) also keeps ``<prefix>targets``: cell id -> what flag rules may target
of it but its id, in the same write, so that cells alike are alike there (see ``groups``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields, replace
from datetime import datetime

import redis.asyncio as aioredis

from common.bus.errors import refuse_foreign_sender
from common.messages import (
    CellCreated,
    CellDecommissioned,
    CellOffline,
    CellOnline,
    CellRegistered,
    CellRegistrationRefused,
    CellTemplateChanged,
    CellUpgrade,
    Delivery,
    Event,
    InfraComplianceChanged,
    Message,
)
from common.report_order import report_order
from common.routes import Route, route
from common.scripts import Change, Changes, decode_many
from common.vocabulary import TERMINAL_PHASES, CellStatus, ComplianceState, Stage

log = logging.getLogger(__name__)

# The registry's events that change a cell's facts; each carries the time it happened.
REGISTRY_FACTS = (
    CellCreated,
    CellRegistered,
    CellOffline,
    CellOnline,
    CellTemplateChanged,
    CellDecommissioned,
)
# How often a fact is applied again when the cell's entry changes under it (two services'
# events for one cell rarely race; running out redelivers the message).
CONFLICT_RETRIES = 8


@dataclass(frozen=True, slots=True)
class FleetCell:
    """What a service knows of a cell. A cell heard of only through liveness events (its
    creation not seen yet) has no stage: it is not ``known`` until it has one."""

    id: str
    stage: Stage | None = None
    region: str | None = None
    org: str | None = None
    status: CellStatus = "created"
    installed_release: str | None = None
    agent_version: str | None = None
    template_version: str | None = None
    compliance: ComplianceState | None = None
    compliance_deadline: str | None = None
    # The newest fact applied from each source (see the module's ordering rule).
    facts_at: float = 0.0
    # The order (common.report_order) of the upgrade report that set installed_release.
    release_generation: int | None = None
    compliance_at: float = 0.0
    # The agent's incarnation: a re-bootstrapped cell (new state directory) has a new one.
    incarnation: str | None = None

    @property
    def known(self) -> bool:
        return self.stage is not None

    @property
    def held(self) -> bool:
        """Past its infrastructure deadline: it gets no application update."""
        return self.compliance == "out_of_sla"

    def attributes(self) -> dict[str, str | None]:
        """What flag rules may target."""
        return dict(zip(ATTRIBUTES, self.target()[0], strict=True))

    def alike(self) -> str:
        """What flag rules may target of the cell, but its id, as a string (``groups``)."""
        values, held = self.target()
        return json.dumps([*values[1:], held], separators=(",", ":"))

    def target(self) -> Target:
        """What a flag rule may target, compactly: its attributes' values (in ATTRIBUTES'
        order) and whether it is held."""
        return (
            (self.id, self.stage, self.region, self.org, self.installed_release,
             self.agent_version, self.status),
            self.held,
        )  # fmt: skip

    def encode(self) -> str:
        return json.dumps(astuple(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> FleetCell:
        return cls(*json.loads(raw))


FIELDS = tuple(f.name for f in fields(FleetCell))
# The attributes flag rules may target (FleetCell.attributes).
ATTRIBUTES = ("id", "stage", "region", "org", "installed_release", "agent_version", "status")
# A cell's attributes' values, in ATTRIBUTES' order, and whether it is held.
Target = tuple[tuple[str | None, ...], bool]


@dataclass(frozen=True, slots=True)
class Group:
    """Cells alike in all that flag rules may target but their ids: ``values`` in ATTRIBUTES'
    order from the second (the id) on."""

    values: tuple[str | None, ...]
    held: bool
    ids: list[str]


def grouped(targets: Iterable[Target]) -> list[Group]:
    """Targets grouped as ``FleetView.groups`` groups them."""
    found: dict[tuple[tuple[str | None, ...], bool], list[str]] = {}
    for values, held in targets:
        found.setdefault((values[1:], held), []).append(str(values[0]))
    return [Group(values, held, ids) for (values, held), ids in found.items()]


def decode_all(raw: list[str]) -> list[FleetCell]:
    """Many entries at once."""
    return [FleetCell(*row) for row in decode_many(raw)]


def _time(at: datetime) -> float:
    return at.timestamp()


def apply_fact(cell: FleetCell | None, cell_id: str, msg: Message) -> FleetCell | None:
    """The cell after ``msg``, or None when ``msg`` changes nothing (older than what is
    recorded from its source, a duplicate, or about a decommissioned cell)."""
    current = cell or FleetCell(cell_id)
    if current.status == "decommissioned":
        return None
    if isinstance(msg, CellUpgrade):
        # A success installs its release; any outcome from an agent that says what it runs
        # after it (a rollback, on a bad verdict too) sets that.
        says = "installed_release" in msg.model_fields_set
        if msg.phase not in TERMINAL_PHASES or not (msg.phase == "succeeded" or says):
            return None
        order = report_order(msg.generation, msg.phase, msg.verdict)
        if current.release_generation is not None and order <= current.release_generation:
            return None
        installed = msg.installed_release if says else msg.release_version
        return replace(current, installed_release=installed, release_generation=order)
    if isinstance(msg, InfraComplianceChanged):
        at = _time(msg.at)
        if at < current.compliance_at:
            return None
        return replace(
            current,
            compliance=msg.status,
            compliance_at=at,
            compliance_deadline=msg.deadline.isoformat() if msg.deadline else None,
        )
    if not isinstance(msg, REGISTRY_FACTS):
        return None
    at = _time(msg.at)
    if at < current.facts_at:
        return None
    new = replace(current, facts_at=at)
    if isinstance(msg, CellCreated):
        return replace(new, stage=msg.stage, region=msg.region, org=msg.org, status="created")
    if isinstance(msg, CellRegistered):
        if msg.incarnation is not None and msg.incarnation != current.incarnation:
            # A new incarnation runs what it reports, and its upgrade reports start afresh.
            new = replace(new, incarnation=msg.incarnation, release_generation=None)
        return replace(
            new,
            stage=msg.stage,
            region=msg.region,
            org=msg.org,
            status="online",
            agent_version=msg.agent_version,
            installed_release=msg.installed_release,
            template_version=msg.template_version,
        )
    if isinstance(msg, CellOffline):
        return replace(new, status="offline")
    if isinstance(msg, CellOnline):
        return replace(new, status="online")
    if isinstance(msg, CellTemplateChanged):
        return replace(new, template_version=msg.template_version)
    return replace(new, status="decommissioned")


def _cell_id(msg: Message) -> str:
    cell_id = getattr(msg, "cell_id", None)
    assert isinstance(cell_id, str), f"{type(msg).__name__} names no cell"
    return cell_id


class FleetView:
    """A service's view of the fleet under ``prefix``. ``changed``: a set every changed cell id
    is added to, in the same write (a controller's "what to read again")."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        *,
        changed: str | None = None,
        with_targets: bool = False,
    ) -> None:
        self.redis = redis
        self.key = prefix + "fleet"
        self.changed = changed
        self.targets_key = prefix + "targets" if with_targets else None
        self._changes = Changes(redis)
        # Each cell's entry as this process last wrote or read it: the guess a fact is
        # decided on first (see apply). Never trusted without Redis checking it.
        self._last: dict[str, str] = {}

    # -- reading ------------------------------------------------------------------------------

    async def get(self, cell_id: str) -> FleetCell | None:
        """A known cell (one whose creation or registration was seen), or None."""
        raw = await self.redis.hget(self.key, cell_id)
        cell = FleetCell.decode(str(raw)) if raw else None
        return cell if cell is not None and cell.known else None

    async def all(self) -> list[FleetCell]:
        """Every known cell, by id."""
        raw = await self.redis.hgetall(self.key)
        cells = (FleetCell.decode(str(v)) for v in raw.values())
        return sorted((c for c in cells if c.known), key=lambda c: c.id)

    async def groups(self) -> list[Group]:
        """Every known cell, grouped with the cells alike in all that flag rules may target but
        their ids: one read of a string a cell, and one decode a group (a fleet has a few
        thousand kinds of cell, not 100,000). Needs ``with_targets``."""
        assert self.targets_key is not None, "a view kept with_targets"
        raw: dict[str, str] = await self.redis.hgetall(self.targets_key)  # type: ignore[assignment]
        ids_of: dict[str, list[str]] = {}
        for cell_id, alike in raw.items():
            ids_of.setdefault(alike, []).append(cell_id)
        found = []
        for alike, ids in ids_of.items():
            *values, held = json.loads(alike)
            if values[0] is not None:  # known: it has a stage
                found.append(Group(tuple(values), bool(held), ids))
        return found

    async def index_targets(self) -> int:
        """Enter in ``<prefix>targets`` the cells it lacks (a view kept before it existed):
        how many. Never overwrites: a fact applied meanwhile wrote the entry it holds."""
        assert self.targets_key is not None, "a view kept with_targets"
        if await self.redis.hlen(self.targets_key) == await self.redis.hlen(self.key):
            return 0
        missing, cursor = 0, 0
        while True:
            cursor, entries = await self.redis.hscan(self.key, cursor, count=5000)
            assert isinstance(entries, dict)  # field -> value (not a no_values scan)
            pipe = self.redis.pipeline(transaction=False)
            for cell_id, raw in entries.items():
                pipe.hsetnx(self.targets_key, cell_id, FleetCell.decode(str(raw)).alike())
            missing += sum(int(added) for added in await pipe.execute())
            if cursor == 0:
                return missing

    async def some(self, ids: list[str]) -> dict[str, FleetCell]:
        """The known cells among ``ids``."""
        if not ids:
            return {}
        raws = await self.redis.hmget(self.key, ids)
        found = (FleetCell.decode(str(raw)) for raw in raws if raw)
        return {c.id: c for c in found if c.known}

    # -- applying facts -----------------------------------------------------------------------

    async def apply(self, msg: Message) -> FleetCell | None:
        """Apply one fact; the cell as written, or None if the fact changed nothing.

        The fact is decided on the cell as this process last wrote or read it (or as absent),
        and written only if the cell is still that; otherwise Redis answers with the cell as it
        is and the fact is decided again. So a fact usually costs one round trip, and a guess
        that is out of date (another replica wrote since) costs one more, never a wrong write.
        A guess that says "changes nothing" is right even when out of date: a cell's entry only
        moves forward (its three times and generation only grow; decommissioned is final).
        """
        cell_id = _cell_id(msg)
        raw = self._last.get(cell_id)
        for _ in range(CONFLICT_RETRIES):
            current = FleetCell.decode(raw) if raw else None
            new = apply_fact(current, cell_id, msg)
            if new is None:
                return None
            encoded = new.encode()
            change = (
                Change()
                .expecting(self.key, cell_id, raw)
                .run("HSET", self.key, cell_id, encoded)
                .reading(self.key, cell_id)
            )
            if self.changed is not None:
                change.run("SADD", self.changed, cell_id)
            if self.targets_key is not None:
                change.run("HSET", self.targets_key, cell_id, new.alike())
            applied = await self._changes.apply(change)
            if applied.written:
                self._last[cell_id] = encoded
                return new
            raw = applied.read.get(cell_id)
            if raw is not None:
                self._last[cell_id] = raw
        raise RuntimeError(f"cell {cell_id}'s facts kept changing; the message is retried")

    async def on_fact(self, msg: Event, delivery: Delivery) -> None:
        await self.apply(msg)

    async def on_ignored(self, msg: Event, delivery: Delivery) -> None:
        """An event on the same queue that changes no fact (acked, not dead-lettered)."""

    async def on_upgrade(self, msg: CellUpgrade, delivery: Delivery) -> None:
        """A cell's upgrade report: a success changes what it runs."""
        refuse_foreign_sender(msg, delivery)
        await self.apply(msg)

    def event_routes(self) -> list[Route]:
        """The handlers of every event that changes the view, for a service's events queue."""
        return [
            *(route(model, self.on_fact) for model in REGISTRY_FACTS),
            route(InfraComplianceChanged, self.on_fact),
            route(CellRegistrationRefused, self.on_ignored),
        ]
