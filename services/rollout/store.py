"""The rollout service's Redis keys.

rollout:fleet                hash: what rollout knows of each cell from events (common.fleet)
rollout:release:<version>    string: the published release (JSON, with who and when)
rollout:releases             set: every published version
rollout:rollouts             hash: version -> the release's rollout (model.Rollout as JSON)
rollout:revisions            hash: version -> its rollout's revision, bumped by every write
rollout:policy               string: the rollout policy (JSON; absent: the defaults)
rollout:windows              hash: cell:<id> or org:<org> -> its maintenance windows (JSON)
rollout:cell:<id>            hash: the desired state rollout last sent the cell (with the
                             bake it asked for and the incarnation it went to), the cell's
                             last report on it and its verdict, an operator's pin and the
                             customer's deferral
rollout:cells                set: every cell with a rollout:cell hash
rollout:dirty                set: cells changed by something other than the controller since
                             its last step (facts, outcome reports, pins): what it reloads
rollout:generation           counter: desired-state generations (one sequence for all cells)
rollout:controller           string: the controller's lease (common.lease)
rollout:tally                hash: version -> the release's per-stage counts (JSON), as the
                             leading controller keeps them (model.tally); "@fence": that
                             controller's lease value, "@at": when it counted, "@deferred":
                             the customers' deferrals (cell id -> [until, release it runs])
rollout:outbox               list: events and desired-state commands not yet published

Whatever the controller writes (a rollout's new state, desired states, the commands that carry
them and the events that announce them) is one Change guarded on the lease, so a step is written
whole or not at all, and only by the current holder.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from sys import intern

import redis.asyncio as aioredis
from pydantic import BaseModel

from common.fleet import FleetCell, FleetView, decode_all
from common.messages import CellUpgrade, Event, Message
from common.outbox import Outbox, outbox_entry
from common.releases import Release
from common.report_order import report_order
from common.requests.rollout import RolloutPolicy
from common.scripts import Change, Changes, Hashes
from common.vocabulary import TERMINAL_PHASES
from common.windows import WindowSet
from services.rollout.model import Assign, CellFacts, Rollout
from services.rollout.model.table import CellTable
from services.rollout.model.tally import Counts
from services.rollout.model.windows import Windows

PREFIX = "rollout:"
RELEASE = PREFIX + "release:"
RELEASES = PREFIX + "releases"
ROLLOUTS = PREFIX + "rollouts"
REVISIONS = PREFIX + "revisions"
OUTBOX = PREFIX + "outbox"
CELL = PREFIX + "cell:"
CELLS = PREFIX + "cells"
DIRTY = PREFIX + "dirty"
POLICY = PREFIX + "policy"
WINDOWS = PREFIX + "windows"
GENERATION = PREFIX + "generation"
LEASE = PREFIX + "controller"
TALLY = PREFIX + "tally"
# Cells read at a time by a full load. What a chunk builds and lets go is spread over the
# allocator's arenas, and an arena stays the process's while any object in it lives: at 5,000
# a chunk a load of 100,000 cells left the service 10 MB larger than at 1,000, in the same time.
LOAD_CHUNK = 1000


@dataclass(frozen=True)
class Counted:
    """The counts the leading controller keeps, as it last wrote them."""

    counts: dict[str, Counts]
    deferred: dict[str, tuple[datetime, str | None]]
    at: datetime


@dataclass(frozen=True)
class Recorded:
    """A report that was kept; for the outcome of the cell's desired state, when that was sent."""

    desired_at: datetime | None


class Stale(Exception):
    """A rollout changed between reading it and writing it; read again."""


class FenceLost(Exception):
    """The controller's lease is held by someone else; this holder must stop writing."""


# An operator's pin and the customer's deferral outlive a re-bootstrap of the cell.
KEPT_ACROSS_INCARNATIONS = ("pinned", "deferred_until", "deferral_reason")


def _when(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


def _facts(cell: FleetCell, own: dict[str, str]) -> CellFacts:
    def opt(key: str) -> str | None:
        value = own.get(key)
        return intern(value) if value else None

    def shared(value: str | None) -> str | None:
        # A fleet has a handful of distinct stages, orgs and releases, each repeated over
        # every cell: one string each instead of one per cell.
        return intern(value) if value else None

    assert cell.stage is not None, "only known cells are read"
    if own.get("incarnation", "") != (cell.incarnation or "") and own.get("incarnation"):
        # What was sent, and reported, was for an earlier incarnation of the cell (it was
        # bootstrapped again with an empty state directory): this one has none of it.
        own = {k: v for k, v in own.items() if k in KEPT_ACROSS_INCARNATIONS}
    gen = own.get("desired_generation")
    report_gen = own.get("report_generation")
    # Built without validating: the fleet view and this service's own writes are the only
    # sources, and a step reads every cell.
    return CellFacts(
        id=cell.id,
        stage=intern(cell.stage),  # type: ignore[arg-type]
        status=intern(cell.status),  # type: ignore[arg-type]
        org=shared(cell.org),
        installed_release=shared(cell.installed_release),
        pinned=opt("pinned"),
        held=cell.held,
        hold_deadline=shared(cell.compliance_deadline) if cell.held else None,
        desired_version=opt("desired_version"),
        desired_generation=int(gen) if gen else None,
        desired_at=_when(own.get("desired_at")),
        previous_version=opt("previous_version"),
        desired_for=opt("desired_for"),
        desired_bake=float(own["desired_bake"]) if own.get("desired_bake") else None,
        report_generation=int(report_gen) if report_gen else None,
        report_phase=opt("report_phase"),
        report_error=opt("report_error"),
        report_verdict=opt("report_verdict"),
        report_check=opt("report_check"),
        report_at=_when(own.get("report_at")),
        incarnation=cell.incarnation,
        deferred_until=_when(own.get("deferred_until")),
        deferral_reason=own.get("deferral_reason") or None,
    )


class Published(BaseModel):
    """A published release as stored: the release, and who published it when."""

    release: Release
    published_at: str
    published_by: str


class RolloutStore:
    def __init__(self, redis: aioredis.Redis, fleet: FleetView | None = None) -> None:
        self.redis = redis
        self.fleet = fleet or FleetView(redis, PREFIX, changed=DIRTY)
        self.outbox = Outbox(redis, OUTBOX)
        self._changes = Changes(redis)
        self._hashes = Hashes(redis)
        self._releases: dict[str, Release] = {}
        # version -> (its JSON, the rollout) as last read
        self._rollouts: dict[str, tuple[str, Rollout]] = {}

    # -- cells --------------------------------------------------------------------------------

    async def upgrade(self, msg: CellUpgrade, at: datetime) -> Recorded | None:
        """A cell's upgrade report: what it runs (the fleet view), then the report itself, which
        is dropped (None) if older than the one recorded or from a cell rollout does not know."""
        await self.fleet.apply(msg)
        return await self.report(msg, at)

    async def report(self, msg: CellUpgrade, at: datetime) -> Recorded | None:
        key = CELL + msg.cell_id
        order = report_order(msg.generation, msg.phase, msg.verdict)
        change = (
            Change()
            .requiring(self.fleet.key, msg.cell_id)
            .if_newer(key, "report_order", order)
            .hset(
                key,
                {
                    "report_order": order,
                    "report_generation": msg.generation,
                    "report_phase": msg.phase,
                    "report_error": msg.error or "",
                    "report_verdict": msg.verdict or "",
                    "report_check": msg.check or "",
                    "report_at": at.timestamp(),
                },
            )
            .run("SADD", CELLS, msg.cell_id)
            .reading(key, "desired_generation", "desired_at", always=True)
        )
        outcome = msg.phase in TERMINAL_PHASES
        if outcome:
            # Only an outcome changes the controller's decisions; the steps before it do not.
            change.run("SADD", DIRTY, msg.cell_id)
        applied = await self._changes.apply(change)
        if not applied.written:
            return None
        sent = applied.read.get("desired_at")
        if outcome and sent and applied.read.get("desired_generation") == str(msg.generation):
            return Recorded(desired_at=datetime.fromtimestamp(float(sent), UTC))
        return Recorded(desired_at=None)

    async def sent(self, cell_id: str) -> tuple[int | None, str | None]:
        """The generation and release last sent to the cell (None, None: nothing yet)."""
        sent: list[str | None] = await self.redis.hmget(  # type: ignore[assignment]
            CELL + cell_id, ["desired_generation", "desired_version"]
        )
        generation, version = sent
        return (int(generation) if generation else None), version or None

    async def cell(self, cell_id: str) -> CellFacts | None:
        fleet = await self.fleet.get(cell_id)
        if fleet is None:
            return None
        own: dict[str, str] = await self.redis.hgetall(CELL + cell_id)  # type: ignore[assignment]
        return _facts(fleet, own)

    async def cells(self) -> list[CellFacts]:
        """Every known cell, by id."""
        found: dict[str, CellFacts] = {}
        await self.each_cell(lambda cell: found.__setitem__(cell.id, cell))
        return [found[i] for i in sorted(found)]

    async def table(self) -> CellTable:
        """Every known cell, in the controller's columns."""
        table = CellTable()
        await self.each_cell(table.put)
        return table

    async def each_cell(self, keep: Callable[[CellFacts], object]) -> None:
        """Every known cell, to ``keep``. Read a thousand cells at a time (the fleet's
        entries, then rollout's own hash of each): what is held at once is what was kept so
        far and one chunk as Redis sent it, not the whole fleet's twice over. Each chunk is
        built in a worker thread, so that the event loop keeps serving meanwhile."""
        cursor = 0
        while True:
            cursor, entries = await self.redis.hscan(self.fleet.key, cursor, count=LOAD_CHUNK)
            assert isinstance(entries, dict)  # field -> value
            fleet = [c for c in decode_all([str(v) for v in entries.values()]) if c.known]
            own = await self._hashes.as_json(CELL, ids=[c.id for c in fleet]) if fleet else []

            def build(fleet: list[FleetCell] = fleet, own: list[dict[str, str]] = own) -> None:
                for cell, mine in zip(fleet, own, strict=True):
                    keep(_facts(cell, mine))

            await asyncio.to_thread(build)
            if cursor == 0:
                return

    async def set_pin(self, cell_id: str, version: str | None) -> None:
        change = (
            Change()
            .hset(CELL + cell_id, {"pinned": version})
            .run("SADD", CELLS, cell_id)
            .run("SADD", DIRTY, cell_id)
        )
        await self._changes.apply(change)

    async def set_deferral(self, cell_id: str, until: datetime | None, reason: str) -> None:
        """The customer's deferral of the cell's updates (None: none)."""
        change = (
            Change()
            .hset(
                CELL + cell_id,
                {
                    "deferred_until": until.timestamp() if until else None,
                    "deferral_reason": reason if until else None,
                },
            )
            .run("SADD", CELLS, cell_id)
            .run("SADD", DIRTY, cell_id)
        )
        await self._changes.apply(change)

    async def changed_cells(self) -> tuple[list[CellFacts], list[str]]:
        """The cells changed since the last call (taken off the dirty set): their facts, and
        the ids of those that are gone."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.smembers(DIRTY)
        pipe.delete(DIRTY)
        ids = sorted(str(i) for i in (await pipe.execute())[0])
        if not ids:
            return [], []
        fleet_raw = await self.redis.hmget(self.fleet.key, ids)
        own = dict(zip(ids, await self._hashes.as_json(CELL, ids=ids), strict=True))

        def build() -> tuple[list[CellFacts], list[str]]:
            found = decode_all([str(raw) for raw in fleet_raw if raw])
            fleet = {c.id: c for c in found if c.known}
            cells = [_facts(fleet[i], own[i]) for i in ids if i in fleet]
            return cells, [i for i in ids if i not in fleet]

        # After a large wave's reports, tens of thousands of cells: built off the event loop.
        return await asyncio.to_thread(build) if len(ids) > 100 else build()

    async def forget_changes(self) -> None:
        """Before a full load: whatever changes after it is in the dirty set again."""
        await self.redis.delete(DIRTY)

    # -- policy and rollouts ---------------------------------------------------------------------

    async def policy(self) -> RolloutPolicy:
        raw = await self.redis.get(POLICY)
        return RolloutPolicy.model_validate_json(raw) if raw else RolloutPolicy()

    async def set_policy(self, policy: RolloutPolicy) -> None:
        await self.redis.set(POLICY, policy.model_dump_json())

    async def window_sets(self) -> dict[str, WindowSet]:
        """Every set of maintenance windows, by ``cell:<id>`` or ``org:<org>``."""
        raw = await self.redis.hgetall(WINDOWS)
        return {str(k): WindowSet.model_validate_json(v) for k, v in raw.items()}

    async def set_windows(self, owner: str, windows: WindowSet | None) -> None:
        if windows is None:
            await self.redis.hdel(WINDOWS, owner)
        else:
            await self.redis.hset(WINDOWS, owner, windows.model_dump_json())

    async def windows(self, policy: RolloutPolicy, rollouts: list[Rollout]) -> Windows:
        return Windows.of(
            await self.window_sets(),
            rollouts,
            all_to_dedicated=policy.window_releases == "all_to_dedicated",
        )

    async def rollout(self, version: str) -> Rollout | None:
        raw = await self.redis.hget(ROLLOUTS, version)
        return Rollout.model_validate_json(raw) if raw else None

    async def rollouts(self) -> list[Rollout]:
        raws: dict[str, str] = await self.redis.hgetall(ROLLOUTS)  # type: ignore[assignment]
        # A rollout that did not change since the last read is the one read then: a stage's
        # waves name each of its cells, and the controller reads every rollout each step.
        read = {}
        for version, raw in raws.items():
            kept = self._rollouts.get(version)
            read[version] = (
                kept
                if kept is not None and kept[0] == raw
                else (raw, Rollout.model_validate_json(raw))
            )
        self._rollouts = read
        return [rollout for _, rollout in read.values()]

    def _write_rollout(self, change: Change, rollout: Rollout, expected_rev: int) -> Rollout:
        """Add the rollout's write to ``change``, if its revision is still ``expected_rev``."""
        new = rollout.model_copy(update={"rev": expected_rev + 1})
        change.expecting(REVISIONS, rollout.version, expected_rev)
        change.run("HSET", ROLLOUTS, rollout.version, new.model_dump_json())
        change.run("HSET", REVISIONS, rollout.version, new.rev)
        return new

    async def save_rollout(self, rollout: Rollout, expected_rev: int) -> None:
        """An operator's change to a rollout, refused with Stale if it changed since read."""
        change = Change()
        self._write_rollout(change, rollout, expected_rev)
        if not (await self._changes.apply(change)).written:
            raise Stale(rollout.version)

    async def generations(self, count: int) -> list[int]:
        """``count`` fresh generations; gaps from a step that was not written are harmless."""
        last = int(await self.redis.incrby(GENERATION, count))
        return list(range(last - count + 1, last + 1))

    async def commit(
        self,
        fence: str,
        *,
        rollout: Rollout | None = None,
        expected_rev: int | None = None,
        assign: Sequence[tuple[Assign, int]] = (),
        at: datetime,
        messages: Sequence[Message] = (),
        bakes: Mapping[str, float | None] | None = None,
    ) -> Rollout | None:
        """Write one controller step whole: the rollout's new state (if it read revision
        ``expected_rev``), the cells' desired states and the messages announcing them. The
        rollout as written (its revision bumped) is returned. (The write is built in a worker
        thread: a step to 50,000 cells encodes as many commands.)"""

        def build() -> tuple[Change, Rollout | None]:
            change = Change().expecting_value(LEASE, fence)
            new = None
            if rollout is not None:
                assert expected_rev is not None
                new = self._write_rollout(change, rollout, expected_rev)
            for message in messages:
                change.push(OUTBOX, outbox_entry(message))
            for a, generation in assign:
                desired = {"desired_version": a.version, "desired_generation": generation}
                sent = {"desired_at": at.timestamp(), "previous_version": a.previous}
                # The bake it was asked for ("": no checks) and the incarnation it was sent to.
                bake = (bakes or {}).get(a.cell_id)
                judged = {
                    "desired_bake": "" if bake is None else bake,
                    "incarnation": a.incarnation,
                    "desired_for": a.path_to or "",
                }
                change.hset(CELL + a.cell_id, {**desired, **sent, **judged})
                change.run("SADD", CELLS, a.cell_id)
            return change, new

        change, new = await asyncio.to_thread(build) if assign else build()
        if not (await self._changes.apply(change)).written:
            if await self.redis.get(LEASE) != fence:
                raise FenceLost(fence)
            raise Stale(rollout.version if rollout else "-")
        return new

    # -- the controller's counts ------------------------------------------------------------------

    async def write_tally(
        self,
        fence: str,
        at: datetime,
        counts: Mapping[str, Counts | None],
        deferred: Mapping[str, tuple[datetime, str | None]] | None,
        *,
        whole: bool,
    ) -> None:
        """The releases' counts that changed (None: the release is gone), and the deferrals if
        they changed; with ``whole``, everything the tally holds, replacing what was there."""
        change = Change().expecting_value(LEASE, fence)
        if whole:
            change.run("DEL", TALLY)
        fields: dict[str, object] = {"@fence": fence, "@at": at.timestamp()}
        for version, stages in counts.items():
            if stages is None:
                change.run("HDEL", TALLY, version)
            else:
                fields[version] = json.dumps(stages, separators=(",", ":"))
        if deferred is not None:
            fields["@deferred"] = json.dumps(
                {i: [until.timestamp(), runs] for i, (until, runs) in deferred.items()}
            )
        change.hset(TALLY, fields)
        if not (await self._changes.apply(change)).written:
            raise FenceLost(fence)

    async def tally(self) -> Counted | None:
        """The counts of the controller that leads now; None if none leads, or it has not
        counted yet."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(LEASE)
        pipe.hgetall(TALLY)
        lease, raw = await pipe.execute()
        if not lease or raw.get("@fence") != lease:
            return None
        deferred = {
            i: (datetime.fromtimestamp(until, UTC), runs)
            for i, (until, runs) in json.loads(raw.get("@deferred") or "{}").items()
        }
        counts = {v: json.loads(c) for v, c in raw.items() if not v.startswith("@")}
        return Counted(counts, deferred, datetime.fromtimestamp(float(raw["@at"]), UTC))

    # -- releases ---------------------------------------------------------------------------------

    async def publish(
        self, release: Release, *, at: datetime, by: str, event: Event, rollout: Rollout
    ) -> bool:
        """A version is published once: the record, the index, its rollout and the event are
        written together, so publishing is what starts the rollout."""
        change = (
            Change()
            .expecting_value(RELEASE + release.version, None)
            .run(
                "SET",
                RELEASE + release.version,
                Published(
                    release=release, published_at=at.isoformat(), published_by=by
                ).model_dump_json(),
            )
            .run("SADD", RELEASES, release.version)
            .run("HSET", ROLLOUTS, release.version, rollout.model_dump_json())
            .run("HSET", REVISIONS, release.version, rollout.rev)
            .push(OUTBOX, outbox_entry(event))
        )
        return (await self._changes.apply(change)).written

    async def get(self, version: str) -> Published | None:
        raw = await self.redis.get(RELEASE + version)
        return Published.model_validate_json(raw) if raw else None

    async def release(self, version: str | None) -> Release | None:
        """A published release (None for none); kept once read, as a release never changes."""
        if version is None:
            return None
        release = self._releases.get(version)
        if release is None:
            record = await self.get(version)
            if record is None:
                return None
            release = self._releases[version] = record.release
        return release

    async def versions(self) -> list[str]:
        return [str(v) for v in await self.redis.smembers(RELEASES)]
